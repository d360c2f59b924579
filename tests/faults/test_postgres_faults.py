"""Faults on the PostgreSQL side: crash restarts, killed sessions, commit-order stragglers."""

import random
import signal
import time
from pathlib import Path

import anyio
import psycopg
import pytest

from outbox_relay.config import Settings
from outbox_relay.embedded import EmbeddedPostgres
from outbox_relay.producer import Producer
from tests.acceptance.cli import env_for, relay_process
from tests.conftest import make_settings
from tests.faults.conftest import (
    Load,
    assert_nothing_lost_or_doubled,
    assert_recovered,
    healed,
    migrated,
)
from tests.helpers import drained, running_relay, wait_until
from tests.servers import Servers

POSTGRES_RESTARTED = "PostgreSQL restarted (immediate) + sessions killed, under load"


@pytest.fixture
async def on_own_postgres(servers: Servers, own_postgres: EmbeddedPostgres) -> Settings:
    return await migrated(
        make_settings(
            Servers(own_postgres.url, servers.nats_url, "own postgres"),
            publish_timeout=2.0,
            poll_interval=30.0,  # long: wake-ups after the faults must come from NOTIFY
            ordered=False,  # ordered relays look at their partitions every 2 s anyway
        )
    )


async def test_postgres_crash_restart_and_killed_sessions_under_load(
    on_own_postgres: Settings, own_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    settings = on_own_postgres
    load = Load(settings, rate=100)
    with relay_process(env_for(settings), tmp_path / "relay.log") as relay:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await anyio.sleep(2)
            await anyio.to_thread.run_sync(own_postgres.restart, "immediate")
            heal = await healed(settings)
            await assert_recovered(POSTGRES_RESTARTED, settings, heal)
            for _ in range(5):  # the listener, and the claim session, again and again
                async with await psycopg.AsyncConnection.connect(
                    settings.database_url, autocommit=True
                ) as admin:
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name LIKE 'outbox-relay%%'"
                        " AND pid <> pg_backend_pid()"
                    )
                await anyio.sleep(1)
            load.stop()
        await wait_until(lambda: drained(settings), within=90)
        assert load.committed > 0

        # Wake-ups work again: one event arrives long before the 30 s poll.
        await anyio.sleep(3)  # the listener's reconnect
        started = time.monotonic()
        producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)
        with psycopg.connect(settings.database_url) as conn:
            producer.emit_event(conn, event_type="after.faults", execution_id=1)
        await wait_until(lambda: drained(settings), within=15)
        assert time.monotonic() - started < 15
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    assert "PostgreSQL unavailable" in relay.output()
    assert "listener lost its connection" in relay.output()
    await assert_nothing_lost_or_doubled(POSTGRES_RESTARTED, settings)


async def test_commit_order_stragglers_are_not_skipped(on_shared: Settings) -> None:
    settings = on_shared
    producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)

    async def straggler() -> None:
        # Takes a low event id and queue id first, commits after everything else.
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
            await producer.emit_event_async(conn, event_type="late", execution_id=0)
            await anyio.sleep(10)
            await conn.commit()

    async def delayed_producer(worker: int) -> None:
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
            for _ in range(50):
                await producer.emit_event_async(conn, event_type="on.time", execution_id=worker)
                await anyio.sleep(random.uniform(0, 0.1))
                await conn.commit()

    async with running_relay(settings):
        async with anyio.create_task_group() as tg:
            tg.start_soon(straggler)
            await anyio.sleep(0.5)
            for worker in range(1, 11):
                tg.start_soon(delayed_producer, worker)
        await wait_until(lambda: drained(settings), within=10)
    await assert_nothing_lost_or_doubled("commit-order stragglers (10 s late commit)", settings)
