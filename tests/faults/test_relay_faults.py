"""Faults of the relay itself: kill -9 at each failpoint, a frozen relay, SIGTERM."""

import re
import signal
import time
from pathlib import Path

import anyio
import pytest
from nats.js.api import StreamConfig

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.failpoints import AFTER_ACK, AFTER_CLAIM, AFTER_PUBLISH, POINTS
from outbox_relay.jetstream import connect_nats
from outbox_relay.verify import Window, verify
from tests.acceptance.cli import env_for, relay_process
from tests.faults.conftest import (
    Load,
    all_started,
    assert_nothing_lost_or_doubled,
    frozen_mid_batch,
)
from tests.helpers import drained, emit_events, lag, wait_until


def duplicates_reported(log: str) -> int:
    match = re.search(r"stopped: published \d+ \((\d+) duplicates\)", log)
    assert match, log
    return int(match[1])


@pytest.mark.parametrize("point", POINTS)
async def test_kill_9_at_each_failpoint_then_restart(
    on_each_path: Settings, tmp_path: Path, point: str, request: pytest.FixtureRequest
) -> None:
    settings = on_each_path
    emit_events(settings, 300)
    env = env_for(settings, OUTBOX_BATCH_SIZE="50")
    with relay_process({**env, "OUTBOX_FAILPOINT": point}, tmp_path / "crash.log") as crashed:
        assert crashed.wait(timeout=30) == -signal.SIGKILL
    assert f"failpoint {point} reached" in crashed.output()
    assert (await lag(settings)).pending == 300  # the crashed batch never committed
    with relay_process(env, tmp_path / "restart.log") as relay:
        await wait_until(lambda: drained(settings), within=30)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    path = request.node.callspec.params["on_each_path"]
    await assert_nothing_lost_or_doubled(f"kill -9 {point}, restart, {path}", settings)
    # The restarted relay publishes the crashed batch again; JetStream reports the
    # copies it already held as duplicates and stores nothing twice.
    duplicates = duplicates_reported(relay.output())
    if path == "fast-ingest":
        # The server deduplicates a fast batch's messages without saying which: the
        # relay cannot count them (verify above is the check).
        assert duplicates == 0
    elif point == AFTER_CLAIM:
        assert duplicates == 0
    elif point == AFTER_ACK:
        # The crashed batch, and any part of the next one, published while it committed.
        assert 50 <= duplicates <= 100
    else:
        assert point == AFTER_PUBLISH
        assert 0 < duplicates <= 50


async def test_a_relay_frozen_longer_than_its_claim_cannot_mark_or_double(
    on_shared: Settings, tmp_path: Path
) -> None:
    settings = on_shared  # publish timeout 2 s: claims are released after 9 s
    emit_events(settings, 20_000)
    env = env_for(settings, OUTBOX_BATCH_SIZE="500")
    load = Load(settings, rate=100)
    with (
        relay_process(env, tmp_path / "zombie.log") as zombie,
        relay_process(env, tmp_path / "b.log") as b,
        relay_process(env, tmp_path / "c.log") as c,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await wait_until(lambda: all_started(zombie, b, c), within=30, interval=0.01)
            await wait_until(lambda: frozen_mid_batch(settings, zombie), within=30, interval=0)
            await anyio.sleep(settings.claim_hold_bound + 6)
            zombie.signal(signal.SIGCONT)
            await anyio.sleep(3)
            load.stop()
        await wait_until(lambda: drained(settings), within=60)
        for relay in (zombie, b, c):
            relay.signal(signal.SIGTERM)
        assert [r.wait(timeout=30) for r in (zombie, b, c)] == [0, 0, 0]
    # Frozen mid-batch: PostgreSQL ended its session (the client reads that as the
    # timeout, or as a closed connection), so its batch could mark nothing.
    assert "PostgreSQL unavailable" in zombie.output()
    await assert_nothing_lost_or_doubled(
        "relay frozen (SIGSTOP) past its claim, 3 relays", settings
    )


async def test_sigterm_under_load_exits_zero_within_bound(
    on_shared: Settings, tmp_path: Path
) -> None:
    settings = on_shared
    env = env_for(settings)
    load = Load(settings, rate=200)
    async with anyio.create_task_group() as tg:
        tg.start_soon(load.run)
        with relay_process(env, tmp_path / "relay.log") as relay:
            await anyio.sleep(2)
            started = time.monotonic()
            relay.signal(signal.SIGTERM)
            assert relay.wait(timeout=20) == 0
            stopped_in = time.monotonic() - started
        load.stop()
    with relay_process(env, tmp_path / "after.log") as after:
        await wait_until(lambda: drained(settings), within=30)
        after.signal(signal.SIGTERM)
        after.wait(timeout=15)
    # Bounded by the batch in flight: its publish timeout plus the statements.
    assert stopped_in < settings.publish_timeout + 10
    await assert_nothing_lost_or_doubled("SIGTERM under load", settings)


async def test_restart_after_the_duplicate_window_stores_twice_and_is_warned(
    on_shared: Settings, tmp_path: Path
) -> None:
    """The documented limit: a batch published but not yet deleted when the relay
    died, re-published after the stream's duplicate window, is stored twice."""
    settings = on_shared
    nc = await connect_nats(settings)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=settings.stream, subjects=[settings.subject_wildcard], duplicate_window=1.0
        )
    )
    emit_events(settings, 50)
    env = env_for(settings, OUTBOX_BATCH_SIZE="50")
    with relay_process({**env, "OUTBOX_FAILPOINT": AFTER_ACK}, tmp_path / "crash.log") as crashed:
        assert crashed.wait(timeout=30) == -signal.SIGKILL
    await anyio.sleep(1.5)  # longer than the duplicate window
    with relay_process(env, tmp_path / "restart.log") as relay:
        await wait_until(lambda: drained(settings), within=30)
        relay.signal(signal.SIGTERM)
        relay.wait(timeout=15)
    assert "is not longer than this relay's claim hold bound" in relay.output()
    async with await connect_postgres(settings, autocommit=True) as conn:
        report = await verify(conn, js, settings, Window())
    await nc.close()
    summary = report.as_dict()
    assert (summary["lost"], summary["duplicate"], summary["unexpected"]) == (0, 50, 0)
