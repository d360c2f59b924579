"""Replay: committed events re-enqueued from the event table, same ids, same bytes."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import pytest
from nats.aio.client import Client as NATS
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import ConfigError
from outbox_relay.ids import EPOCH_MS
from outbox_relay.jetstream import ensure_stream
from outbox_relay.replay import ReplaySelection, replay
from outbox_relay.verify import Window, verify
from tests.helpers import (
    assert_exactly_once,
    drained,
    emit_events,
    fetch_all,
    producer_for,
    running_relay,
    stream_count,
    stream_messages,
    wait_until,
)
from tests.noetl import EVENT_TABLES, NOETL_CATALOG_ID, event_columns, migrated


@pytest.fixture(params=EVENT_TABLES)
async def outbox(request: pytest.FixtureRequest, unmigrated: Settings) -> Settings:
    """Every test here runs over our event table and over NoETL's."""
    return await migrated(unmigrated, request.param)


async def _replay(settings: Settings, selection: ReplaySelection, *, dry_run: bool = False) -> int:
    async with await connect_postgres(settings) as conn:
        count = await replay(
            conn,
            settings.names,
            settings.subject_prefix,
            selection,
            ordering_key=settings.ordering_key,
            dry_run=dry_run,
        )
        await conn.commit()
    return count


async def test_a_lost_stream_is_rebuilt_byte_for_byte(outbox: Settings, nc: NATS) -> None:
    first = emit_events(outbox, 6, execution_id=1)
    second = emit_events(outbox, 4, execution_id=2)
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
        original = {
            m.headers["Nats-Msg-Id"]: m for m in await stream_messages(nc, outbox) if m.headers
        }
        # The stream is lost and made anew (a purge would keep its duplicate tracking).
        await nc.jetstream().delete_stream(outbox.stream)
        await ensure_stream(nc.jetstream(), outbox)

        only_first = ReplaySelection(execution_ids=(1,))
        assert await _replay(outbox, only_first, dry_run=True) == 6
        assert await _replay(outbox, only_first) == 6
        await wait_until(lambda: drained(outbox))
    replayed = await stream_messages(nc, outbox)
    assert_exactly_once(replayed, first)
    for message in replayed:
        assert message.headers
        before = original[message.headers["Nats-Msg-Id"]]
        assert (message.subject, message.data) == (before.subject, before.data)
    assert not set(second) & {m.headers["Nats-Msg-Id"] for m in replayed if m.headers}


async def test_a_replay_inside_the_duplicate_window_is_collapsed(
    outbox: Settings, nc: NATS
) -> None:
    ids = emit_events(outbox, 5)
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
        assert await _replay(outbox, ReplaySelection(Window(int(ids[1]), int(ids[3])))) == 3
        await wait_until(lambda: drained(outbox))
    assert await stream_count(nc, outbox) == 5


async def test_an_unbounded_replay_needs_all(outbox: Settings) -> None:
    emit_events(outbox, 2)
    with pytest.raises(ConfigError, match="--all"):
        await _replay(outbox, ReplaySelection())
    assert await _replay(outbox, ReplaySelection(everything=True), dry_run=True) == 2


async def test_replayed_events_keep_their_key_and_their_order(outbox: Settings, nc: NATS) -> None:
    """Replay used to drop the ordering key: 3,000 events over 30 executions came back
    179 out of order, without ordering headers, and verify called it clean."""
    producer = producer_for(outbox)
    with psycopg.connect(outbox.database_url, autocommit=True) as conn:
        for step in range(20):
            for execution_id in range(30):
                producer.emit_event(
                    conn,
                    event_type="step",
                    execution_id=execution_id,
                    node_id=str(step),
                    **event_columns(outbox),
                )
    # Never published (no relay ran): the outbox rows go, the events are replayed.
    async with await connect_postgres(outbox, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DELETE FROM {}").format(sql.Identifier(outbox.schema, "event_outbox"))
        )
    assert await _replay(outbox, ReplaySelection(everything=True)) == 600
    async with running_relay(outbox, "a"), running_relay(outbox, "b"):
        await wait_until(lambda: drained(outbox), within=30)
    steps: dict[int, list[int]] = defaultdict(list)
    for message in await stream_messages(nc, outbox):
        assert message.headers
        event = orjson.loads(message.data)
        assert message.headers["Outbox-Ordering-Key"] == str(event["execution_id"])
        steps[event["execution_id"]].append(int(event["node_id"]))
    assert all(seen == list(range(20)) for seen in steps.values())
    async with await connect_postgres(outbox, autocommit=True) as conn:
        report = await verify(conn, nc.jetstream(), outbox, Window())
    assert report.ok == 600
    assert report.clean, report.as_dict()


async def test_a_null_event_type_is_replayed_as_unknown(noetl_outbox: Settings) -> None:
    # NoETL allows it; its tailer published such events as <prefix>.unknown.
    schema = sql.Identifier(noetl_outbox.schema)
    with psycopg.connect(noetl_outbox.database_url) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {s}.event (event_id, execution_id, catalog_id, event_type)"
                " VALUES ({s}.snowflake_id(), 7, %s, NULL)"
            ).format(s=schema),
            (NOETL_CATALOG_ID,),
        )
    assert await _replay(noetl_outbox, ReplaySelection(execution_ids=(7,))) == 1
    rows = await fetch_all(
        noetl_outbox, sql.SQL("SELECT subject FROM {s}.event_outbox").format(s=schema)
    )
    assert rows == [(f"{noetl_outbox.subject_prefix}.unknown",)]


def _rust_id(moment: datetime, sequence: int) -> int:
    """An id as NoETL's Rust server mints it: (ms << 22) | (node << 12) | sequence."""
    return ((int(moment.timestamp() * 1000) - EPOCH_MS) << 22) | (3 << 12) | sequence


async def test_a_time_window_selects_by_the_events_time_not_its_id_bits(
    outbox: Settings,
) -> None:
    now = datetime.now(UTC)
    producer = producer_for(outbox)
    with psycopg.connect(outbox.database_url) as conn:
        for sequence, age in enumerate((timedelta(0), timedelta(minutes=1), timedelta(days=2))):
            moment = now - age
            producer.emit_event(
                conn,
                event_type="rust.minted",
                execution_id=5,
                event_id=_rust_id(moment, sequence),
                created_at=moment.replace(tzinfo=None),  # NoETL's created_at: UTC wall time
                **event_columns(outbox),
            )
    recent = ReplaySelection(since=now - timedelta(minutes=10))
    assert await _replay(outbox, recent, dry_run=True) == 2
    older = ReplaySelection(until=now - timedelta(days=1))
    assert await _replay(outbox, older, dry_run=True) == 1
