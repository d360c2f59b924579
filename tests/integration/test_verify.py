from dataclasses import replace

import anyio
import nats
import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import ServerUnavailableError
from outbox_relay.ids import SnowflakeGenerator
from outbox_relay.jetstream import ensure_stream, read_stream_batches
from outbox_relay.verify import Window, verify
from tests.helpers import drained, emit_events, producer_for, running_relay, wait_until
from tests.noetl import EVENT_TABLES, NOETL_CATALOG_ID, migrated
from tests.proxy import TcpProxy
from tests.servers import Servers

ALL = Window()


@pytest.fixture(params=EVENT_TABLES)
async def outbox(request: pytest.FixtureRequest, unmigrated: Settings) -> Settings:
    """Every test here runs over our event table and over NoETL's."""
    return await migrated(unmigrated, request.param)


async def run_verify(settings: Settings, nc: NATS, window: Window = ALL) -> dict[str, int]:
    async with await connect_postgres(settings, autocommit=True) as conn:
        report = await verify(conn, nc.jetstream(), settings, window)
    summary = report.as_dict()
    return {k: summary[k] for k in ("ok", "pending", "lost", "duplicate", "unexpected")}


async def test_a_clean_run_is_all_ok(outbox: Settings, nc: NATS) -> None:
    async with running_relay(outbox):
        ids = emit_events(outbox, 30)
        await wait_until(lambda: drained(outbox))
    assert await run_verify(outbox, nc) == {
        "ok": 30,
        "pending": 0,
        "lost": 0,
        "duplicate": 0,
        "unexpected": 0,
    }
    assert (await run_verify(outbox, nc, Window(int(ids[10]), int(ids[19]))))["ok"] == 10


async def test_lost_pending_duplicate_and_unexpected_are_reported(
    outbox: Settings, nc: NATS
) -> None:
    js = nc.jetstream()
    # A one-second duplicate window, so a second copy can be stored on purpose.
    await js.add_stream(
        StreamConfig(
            name=outbox.stream,
            subjects=[outbox.subject_wildcard],
            duplicate_window=1,
        )
    )
    await ensure_stream(js, outbox)
    published = emit_events(outbox, 3)
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
    pending = emit_events(outbox, 2)  # no relay: they wait
    lost = emit_events(outbox, 1)
    async with await connect_postgres(outbox, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DELETE FROM {}.event_outbox WHERE event_id = %s").format(
                sql.Identifier(outbox.schema)
            ),
            (str(lost[0]),),
        )
    subject = f"{outbox.subject_prefix}.v"
    await nc.flush()
    await anyio.sleep(1.2)  # past the duplicate window
    await js.publish(subject, b"again", headers={"Nats-Msg-Id": str(published[0])})
    await js.publish(subject, b"stray", headers={"Nats-Msg-Id": "12345"})
    assert await run_verify(outbox, nc) == {
        "ok": 2,
        "pending": len(pending),
        "lost": 1,
        "duplicate": 1,
        "unexpected": 1,
    }


async def test_an_event_message_without_its_ordering_headers_is_a_violation(
    outbox: Settings, nc: NATS
) -> None:
    """What a replay or a relay of an older release that dropped the key leaves behind;
    verify used to call it clean."""
    async with running_relay(outbox):
        emit_events(outbox, 3, execution_id=7)
        await wait_until(lambda: drained(outbox))
    keyed = await run_verify(outbox, nc)
    assert keyed["ok"] == 3
    # The same kind of row published by hand, without Outbox-Ordering-Key/-Sequence.
    stray = emit_events(outbox, 1, execution_id=7)
    async with await connect_postgres(outbox, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("DELETE FROM {} RETURNING subject, payload").format(
                sql.Identifier(outbox.schema, "event_outbox")
            )
        )
        subject, payload = (await cur.fetchall())[0]
    await nc.jetstream().publish(subject, bytes(payload), headers={"Nats-Msg-Id": stray[0]})
    async with await connect_postgres(outbox, autocommit=True) as conn:
        report = await verify(conn, nc.jetstream(), outbox, ALL)
    assert report.unkeyed == [int(stray[0])]
    assert not report.clean
    # Told that events are unkeyed, verify expects no key.
    async with await connect_postgres(outbox, autocommit=True) as conn:
        unkeyed = replace(outbox, ordering_key=None)
        assert (await verify(conn, nc.jetstream(), unkeyed, ALL)).unkeyed == []


async def test_one_msg_id_shared_by_two_rows_is_collided_not_clean(
    noetl_outbox: Settings, nc: NATS
) -> None:
    # Two executions' events with one id (as NoETL's shard 1 and a relay could mint):
    # JetStream keeps the first and drops the second as a duplicate msg id.
    producer = producer_for(noetl_outbox)
    shared = SnowflakeGenerator(7).next_id()
    with psycopg.connect(noetl_outbox.database_url, autocommit=True) as conn:
        for execution_id in (1, 2):
            producer.emit_event(
                conn,
                event_type="step.exit",
                execution_id=execution_id,
                event_id=shared,
                catalog_id=NOETL_CATALOG_ID,
            )
    async with running_relay(noetl_outbox):
        await wait_until(lambda: drained(noetl_outbox))
    async with await connect_postgres(noetl_outbox, autocommit=True) as conn:
        report = await verify(conn, nc.jetstream(), noetl_outbox, ALL)
    summary = report.as_dict()
    assert (summary["collided"], summary["ok"], summary["lost"]) == (1, 1, 1)
    assert summary["samples"]["collided"] == [shared]
    assert not report.clean


Rows = dict[str, tuple[str, bytes]]  # event id -> subject, payload


async def _hand_published(settings: Settings, nc: NATS, count: int) -> tuple[list[str], Rows]:
    """``count`` events of execution 7, written one after another, taken out of the
    outbox unpublished: the test publishes them itself, as a faulty relay would."""
    ids = emit_events(settings, count, execution_id=7)
    await ensure_stream(nc.jetstream(), settings)
    async with await connect_postgres(settings, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("DELETE FROM {} RETURNING event_id, subject, payload").format(
                sql.Identifier(settings.schema, "event_outbox")
            )
        )
        rows = {row[0]: (row[1], bytes(row[2])) for row in await cur.fetchall()}
    return ids, rows


async def _publish(settings: Settings, nc: NATS, rows: Rows, event_id: str, seq: int) -> None:
    subject, payload = rows[event_id]
    headers = {
        "Nats-Msg-Id": event_id,
        "Nats-Expected-Stream": settings.stream,
        "Outbox-Ordering-Key": "7",
        "Outbox-Sequence": str(seq),
    }
    await nc.jetstream().publish(subject, payload, headers=headers)


async def test_a_reordered_a_repeated_and_a_dropped_message_are_caught(
    outbox: Settings, nc: NATS
) -> None:
    """As the order holes left them: a key's rows published out of id order with
    sequences that agree with the wrong order, a stale copy landing after later events,
    an event never published."""
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=outbox.stream, subjects=[outbox.subject_wildcard], duplicate_window=1)
    )
    ids, rows = await _hand_published(outbox, nc, 5)
    first, second, third, fourth, dropped = ids
    await _publish(outbox, nc, rows, first, 10)
    await _publish(outbox, nc, rows, third, 11)  # passed over `second`, numbered so
    await _publish(outbox, nc, rows, second, 12)
    await anyio.sleep(1.2)  # past the duplicate window
    await _publish(outbox, nc, rows, fourth, 13)
    await _publish(outbox, nc, rows, first, 10)  # a stale frame, delivered at a heal
    async with await connect_postgres(outbox, autocommit=True) as conn:
        loose = await verify(conn, js, outbox, ALL)
        strict = await verify(conn, js, outbox, ALL, strict_order=True)
    assert (loose.out_of_order, loose.duplicate, loose.lost) == (
        [int(first)],
        {int(first): 2},
        [int(dropped)],
    )
    # Only the database's order shows the pass-over: the sequences agree with it.
    assert strict.out_of_order == [int(second), int(first)]
    assert not loose.clean
    assert not strict.clean


async def _read_stalled_after_one_batch(js: JetStreamContext, stream: str, proxy: TcpProxy) -> int:
    read = 0
    async for batch in read_stream_batches(js, stream, fetch_wait=1.0):
        read += len(batch)
        proxy.delay = 3.0  # the server stops answering in time
    return read


async def test_a_read_the_server_stops_answering_is_an_error_not_a_verdict(
    outbox: Settings, servers: Servers
) -> None:
    """nats-server paused during a read used to read as "183000 lost", exit 5."""
    proxy = await TcpProxy(servers.nats_url).start()
    nc = await nats.connect(proxy.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, outbox)
        for n in range(2500):
            await nc.publish(f"{outbox.subject_prefix}.x", b"{}", headers={"Nats-Msg-Id": str(n)})
        await nc.flush()
        with pytest.raises(ServerUnavailableError, match="stopped after 1,000 messages"):
            await _read_stalled_after_one_batch(js, outbox.stream, proxy)
    finally:
        proxy.delay = 0
        await nc.close()
        await proxy.close()


async def test_relay_headers_on_a_server_never_promoted_are_not_called_a_failover(
    outbox: Settings, nc: NATS
) -> None:
    """Anyone can set the relay's headers: a message of an event the database never
    had is rolled back by a failover only on a server that has changed timeline."""
    js = nc.jetstream()
    await ensure_stream(js, outbox)
    headers = {"Nats-Msg-Id": "4242", "Nats-Expected-Stream": outbox.stream}
    await js.publish(f"{outbox.subject_prefix}.x", b"{}", headers=headers)
    async with await connect_postgres(outbox, autocommit=True) as conn:
        report = await verify(conn, js, outbox, ALL)
    assert (report.timeline, report.unexpected, report.rolled_back_by_failover) == (1, [4242], [])
