"""Replay: committed events re-enqueued from the event table, same ids, same bytes."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import ConfigError
from outbox_relay.jetstream import ensure_stream
from outbox_relay.replay import ReplaySelection, replay
from outbox_relay.verify import Window
from tests.helpers import (
    assert_exactly_once,
    drained,
    emit_events,
    running_relay,
    stream_count,
    stream_messages,
    wait_until,
)
from tests.noetl import EVENT_TABLES, migrated


@pytest.fixture(params=EVENT_TABLES)
async def outbox(request: pytest.FixtureRequest, unmigrated: Settings) -> Settings:
    """Every test here runs over our event table and over NoETL's."""
    return await migrated(unmigrated, request.param)


async def _replay(settings: Settings, selection: ReplaySelection, *, dry_run: bool = False) -> int:
    async with await connect_postgres(settings) as conn:
        count = await replay(
            conn, settings.names, settings.subject_prefix, selection, dry_run=dry_run
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
