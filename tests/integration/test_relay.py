import logging
import time
from dataclasses import replace
from typing import Any

import anyio
import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from tests.helpers import (
    assert_exactly_once,
    dead_letters,
    drained,
    emit_events,
    fetch_all,
    lag,
    producer_for,
    running_relay,
    stream_count,
    stream_messages,
    wait_until,
)


async def test_committed_events_arrive_once_with_subject_msg_id_and_payload(
    outbox: Settings, nc: NATS
) -> None:
    async with running_relay(outbox):
        ids = emit_events(outbox, 50)
        await wait_until(lambda: drained(outbox))
    messages = await stream_messages(nc, outbox)
    assert_exactly_once(messages, ids)
    payloads = dict(
        await fetch_all(
            outbox,
            sql.SQL(
                "SELECT event_id::text, convert_to(to_jsonb(e)::text, 'UTF8') FROM {}.event e"
            ).format(sql.Identifier(outbox.schema)),
        )
    )
    for message in messages:
        assert message.headers is not None
        event_id = message.headers["Nats-Msg-Id"]
        assert message.data == payloads[event_id]  # the bytes, untouched
        assert message.subject == f"{outbox.subject_prefix}.test.event"


async def test_a_producers_trace_context_reaches_the_message(
    outbox: Settings, nc: NATS, db: psycopg.Connection[Any]
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {"traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE"}
    producer_for(outbox).emit_event(db, event_type="traced", execution_id=1, headers=headers)
    db.commit()
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
    (message,) = await stream_messages(nc, outbox)
    assert message.headers is not None
    assert message.headers["traceparent"] == traceparent
    assert message.headers["tracestate"] == "congo=t61rcWkgMzE"


async def test_rolled_back_events_never_reach_the_stream(outbox: Settings, nc: NATS) -> None:
    producer = producer_for(outbox)
    async with running_relay(outbox):
        with psycopg.connect(outbox.database_url) as conn, conn.transaction():
            producer.emit_event(conn, event_type="doomed", execution_id=1)
            raise psycopg.Rollback  # the application changes its mind
        kept = emit_events(outbox, 1)
        await wait_until(lambda: drained(outbox))
    assert_exactly_once(await stream_messages(nc, outbox), kept)


async def test_the_stream_is_created_as_noetls_tailer_did(outbox: Settings, nc: NATS) -> None:
    async with running_relay(outbox):
        pass
    config = (await nc.jetstream().stream_info(outbox.stream)).config
    assert config.subjects == [f"{outbox.subject_prefix}.>"]
    assert config.storage == StorageType.FILE
    assert config.duplicate_window == outbox.duplicate_window
    assert config.max_age == outbox.max_age


async def test_an_existing_stream_is_left_untouched_with_a_warning(
    outbox: Settings, nc: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=outbox.stream,
            subjects=[outbox.subject_wildcard],
            storage=StorageType.MEMORY,
            duplicate_window=30,
        )
    )
    with caplog.at_level(logging.WARNING):
        async with running_relay(outbox):
            pass
    config = (await js.stream_info(outbox.stream)).config
    assert (config.storage, config.duplicate_window) == (StorageType.MEMORY, 30)
    assert "duplicate window of 30s, shorter than the configured 2m" in caplog.text


async def test_notify_wakes_the_relay_long_before_the_poll_interval(
    unmigrated: Settings, nc: NATS
) -> None:
    settings = replace(unmigrated, poll_interval=120.0, ordered=False)  # wake-ups by NOTIFY
    async with await connect_postgres(settings) as conn:
        from outbox_relay.schema import migrate

        await migrate(conn, settings.names, create_event_table=True)
    async with running_relay(settings):
        await anyio.sleep(0.5)  # let the first poll pass; only a notification can wake it now
        for _ in range(3):
            started = time.monotonic()
            emit_events(settings, 1)
            await wait_until(lambda: drained(settings), within=10)
            # Functional, not a benchmark: a relay that only polled would take 120 s.
            assert time.monotonic() - started < 10


async def test_poison_rows_are_retried_then_dead_lettered_without_blocking_others(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, max_attempts=3)
    producer = producer_for(settings)
    async with running_relay(settings) as relay:
        with psycopg.connect(settings.database_url) as conn:
            producer.enqueue(conn, subject="unbound.subject", payload=b"x", msg_id="poison-1")
            conn.commit()
        good = emit_events(settings, 20)
        await wait_until(lambda: stream_has(nc, settings, 20))
        await wait_until(lambda: drained(settings))
    assert_exactly_once(await stream_messages(nc, settings), good)
    rows = await fetch_all(settings, dead_letters(settings))
    assert rows == [("poison-1", "unbound.subject", 3, "no stream binds subject unbound.subject")]
    assert relay.stats.dead_lettered == 1
    assert relay.stats.retried == 2
    assert (await lag(settings)).dead_letters == 1


async def stream_has(nc: NATS, settings: Settings, count: int) -> bool:
    try:
        return await stream_count(nc, settings) >= count
    except Exception:  # noqa: BLE001 - the stream may not exist yet
        return False


async def test_payload_over_max_payload_once_headers_are_added(outbox: Settings, nc: NATS) -> None:
    settings = replace(outbox, max_attempts=1)
    limit = nc.max_payload
    # A producer configured above the server's limit (it counts the relay's headers
    # against its own maximum), or a row from the SQL function, which counts the
    # payload only: under the server's limit by itself, over it with the header block.
    producer = producer_for(settings, max_payload=2 * limit)
    async with running_relay(settings):
        with psycopg.connect(settings.database_url) as conn:
            producer.enqueue(
                conn,
                subject=f"{settings.subject_prefix}.big",
                payload=b"x" * (limit - 10),
                msg_id="big-1",
            )
            conn.commit()
        good = emit_events(settings, 5)
        await wait_until(lambda: drained(settings))
        assert_exactly_once(await stream_messages(nc, settings), good)
        # The connection survived: later rows still flow.
        more = emit_events(settings, 5)
        await wait_until(lambda: drained(settings))
    assert_exactly_once(await stream_messages(nc, settings), [*good, *more])
    ((_, _, attempts, reason),) = await fetch_all(settings, dead_letters(settings))
    assert attempts == 1
    assert f"exceeds the server's max_payload of {limit} bytes" in reason


async def test_message_over_the_streams_max_msg_size_is_dead_lettered(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, max_attempts=2)
    await nc.jetstream().add_stream(
        StreamConfig(
            name=settings.stream,
            subjects=[settings.subject_wildcard],
            max_msg_size=1000,
            duplicate_window=120,
        )
    )
    producer = producer_for(settings)
    async with running_relay(settings):
        with psycopg.connect(settings.database_url) as conn:
            producer.enqueue(
                conn,
                subject=f"{settings.subject_prefix}.big",
                payload=b"x" * 2000,
                msg_id="too-big",
            )
            conn.commit()
        good = emit_events(settings, 5)
        await wait_until(lambda: drained(settings))
    assert_exactly_once(await stream_messages(nc, settings), good)
    ((event_id, _, attempts, reason),) = await fetch_all(settings, dead_letters(settings))
    assert (event_id, attempts) == ("too-big", 2)
    assert "message size exceeds maximum allowed" in reason


async def test_two_relays_publish_each_row_once(outbox: Settings, nc: NATS) -> None:
    # Unordered: both relays take rows of every execution, kept apart by SKIP LOCKED.
    settings = replace(outbox, batch_size=50, ordered=False)
    async with running_relay(settings, "a") as a, running_relay(settings, "b") as b:
        async with anyio.create_task_group() as tg:
            results: list[list[str]] = []

            async def produce(execution_id: int) -> None:
                results.append(
                    await anyio.to_thread.run_sync(
                        lambda: emit_events(settings, 400, execution_id=execution_id)
                    )
                )

            for execution_id in range(1, 4):
                tg.start_soon(produce, execution_id)
        await wait_until(lambda: drained(settings), within=60)
    expected = set().union(*results)
    assert_exactly_once(await stream_messages(nc, settings), expected)
    # SKIP LOCKED kept the relays apart: no row was even sent twice.
    assert a.stats.published + b.stats.published == len(expected) == 1200
    assert a.stats.duplicates == b.stats.duplicates == 0
    assert a.stats.published > 0
    assert b.stats.published > 0


async def test_lag_counts_pending_rows_their_age_and_dead_letters(outbox: Settings) -> None:
    assert (await lag(outbox)).as_dict() == {
        "pending": 0,
        "oldest_age_seconds": 0.0,
        "dead_letters": 0,
        "held": 0,
    }
    emit_events(outbox, 3)
    await anyio.sleep(0.2)
    current = await lag(outbox)
    assert current.pending == 3
    assert 0.2 <= current.oldest_age_seconds < 30
    assert current.dead_letters == 0


async def test_a_missing_stream_never_counts_against_rows(outbox: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    async with running_relay(outbox) as relay:
        first = emit_events(outbox, 3)
        await wait_until(lambda: drained(outbox))
        await js.delete_stream(outbox.stream)
        second = emit_events(outbox, 3)
        # The relay creates it again, as at start: no operator needed.
        await wait_until(lambda: drained(outbox))
        assert (relay.stats.retried, relay.stats.dead_lettered) == (0, 0)  # never blamed
    assert_exactly_once(await stream_messages(nc, outbox), second)
    assert set(first).isdisjoint(second)
    assert (await lag(outbox)).dead_letters == 0


async def test_a_relay_holds_the_postgresql_connections_the_readme_counts(
    outbox: Settings,
) -> None:
    """README (Connections): two batch sessions, the listener and the lag watcher."""

    async def sessions() -> int:
        async with await connect_postgres(outbox, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                ("outbox-relay counted",),
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def four() -> bool:
        return await sessions() == 4

    async with running_relay(outbox, "counted"):
        await wait_until(four)
        await anyio.sleep(outbox.poll_interval)  # idle a while: no more appear
        assert await sessions() == 4
