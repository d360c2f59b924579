from dataclasses import replace

import anyio
import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.ids import SnowflakeGenerator
from outbox_relay.jetstream import ensure_stream
from outbox_relay.verify import Window, verify
from tests.helpers import drained, emit_events, producer_for, running_relay, wait_until
from tests.noetl import EVENT_TABLES, NOETL_CATALOG_ID, migrated

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
