"""Producers notify only while a relay sleeps, and no wake-up is lost on the way."""

import random
import threading
import time
from dataclasses import replace
from typing import Any

import anyio
import psycopg
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.producer import Producer
from outbox_relay.queries import IDLE_LOCK_CLASS
from tests.helpers import drained, emit_events, running_relay, wait_until


def slow_poll(settings: Settings) -> Settings:
    # Unordered: in ordered mode an idle relay looks at its partitions every 2 s,
    # which would hide a lost wake-up.
    return replace(settings, poll_interval=120.0, ordered=False)


def notifications_after(settings: Settings, action: Any) -> int:
    with psycopg.connect(settings.database_url, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(settings.names.channel)))
        action()
        return sum(1 for _ in listener.notifies(timeout=1.0))


async def a_relay_sleeps(settings: Settings) -> bool:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND mode = 'ExclusiveLock' AND classid::bigint = %s AND objid::bigint = %s",
            (IDLE_LOCK_CLASS, settings.names.lock_object),
        ).fetchone()
    return bool(row and row[0])


async def test_producers_skip_notify_unless_a_relay_sleeps(outbox: Settings) -> None:
    settings = slow_poll(outbox)
    # No relay sleeps: committing costs no NOTIFY.
    assert notifications_after(settings, lambda: emit_events(settings, 5)) == 0
    async with running_relay(settings):
        await wait_until(lambda: drained(settings), within=10)
        await wait_until(lambda: a_relay_sleeps(settings), within=10)
        # A relay sleeps: the next commit wakes it, long before its 120 s poll.
        started = time.monotonic()
        assert notifications_after(settings, lambda: emit_events(settings, 1)) == 1
        await wait_until(lambda: drained(settings), within=10)
        assert time.monotonic() - started < 10


async def test_no_wakeup_is_lost_around_idle_transitions(outbox: Settings) -> None:
    settings = slow_poll(outbox)  # a lost wake-up would stall a round for 120 s
    producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)

    def burst(worker: int, rng: random.Random) -> None:
        with psycopg.connect(settings.database_url) as conn:
            for _ in range(rng.randint(1, 5)):
                producer.emit_event(conn, event_type="burst", execution_id=worker)
                time.sleep(rng.uniform(0, 0.01))  # between insert and commit
                conn.commit()

    rng = random.Random(7)
    async with running_relay(settings, "a"), running_relay(settings, "b"):
        for _ in range(100):
            threads = [
                threading.Thread(target=burst, args=(w, random.Random(rng.random())))
                for w in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                await anyio.to_thread.run_sync(thread.join)
            await wait_until(lambda: drained(settings), within=10, interval=0.01)
            await anyio.sleep(rng.uniform(0, 0.05))  # land anywhere in the relays' cycle


def statements_seen(settings: Settings, application_name: str, seconds: float) -> int:
    """Distinct statement starts of the named sessions, sampled every millisecond or so."""
    starts = set()
    deadline = time.monotonic() + seconds
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            for pid, started in conn.execute(
                "SELECT pid, query_start FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            ):
                starts.add((pid, started))
    return len(starts)


async def test_an_idle_relay_stays_idle_while_a_producer_transaction_is_open(
    outbox: Settings,
) -> None:
    """It used to re-poll every 5 ms for as long as a producer that wrote while no relay
    slept (so it holds the idle lock shared, and will not notify) stayed uncommitted."""
    # The default poll interval; the lag watcher kept quiet.
    settings = replace(outbox, poll_interval=5.0, lag_interval=3600.0)
    producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)
    with psycopg.connect(settings.database_url) as conn:
        producer.emit_event(conn, event_type="long.transaction", execution_id=1)
        async with running_relay(settings, "idle"):
            await anyio.sleep(1)
            seconds = 6.0
            seen = await anyio.to_thread.run_sync(
                statements_seen, settings, "outbox-relay idle", seconds
            )
            conn.commit()
            committed = time.monotonic()
            await wait_until(lambda: drained(settings), within=5, interval=0.01)
            # Woken by the commit itself, not by a poll.
            assert time.monotonic() - committed < 1
    assert seen / seconds <= 6, f"{seen} statements in {seconds:.0f} s"
