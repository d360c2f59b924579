"""Fault injection on real servers; each test ends with ``verify``: nothing lost or doubled."""

from __future__ import annotations

import itertools
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
import pytest
from nats.aio.client import Client as NATS
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.embedded import EmbeddedNats, EmbeddedPostgres
from outbox_relay.jetstream import BatchSupport, connect_nats, ensure_stream
from outbox_relay.producer import Producer
from outbox_relay.verify import Window, verify
from tests.acceptance.cli import RelayProcess
from tests.conftest import make_settings, skip_unless_server_takes
from tests.helpers import drained, fetch_all, wait_until
from tests.noetl import EVENT_TABLES, event_columns
from tests.noetl import migrated as migrated_over
from tests.servers import Servers

pytestmark = pytest.mark.slow

# What each fault test measured, shown at the end of the run.
RESULTS: list[tuple[str, dict[str, Any]]] = []
# Seconds from the end of each fault until the backlog it left was delivered.
RECOVERY: dict[str, float] = {}
# The bound the README's fault table states for that; a test past it fails.
RECOVERY_BOUND = 10.0


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fault injection: verify after each fault")
    terminalreporter.write_line(
        f"{'fault':<64}{'events':>8}{'lost':>6}{'dup':>5}{'unexp':>7}{'order':>7}{'unkey':>7}"
        f"{'rolled back':>12}{'recovery':>10}"
    )
    for name, summary in RESULTS:
        recovery = f"{RECOVERY[name]:.1f}s" if name in RECOVERY else "-"
        terminalreporter.write_line(
            f"{name:<64}{summary['ok']:>8}{summary['lost']:>6}{summary['duplicate']:>5}"
            f"{summary['unexpected']:>7}{summary['out_of_order']:>7}{summary['unkeyed']:>7}"
            f"{summary['rolled_back_by_failover']:>12}{recovery:>10}"
        )


@pytest.fixture
def own_nats() -> Iterator[EmbeddedNats]:
    """A nats-server of this test's own, to stop, freeze and restart."""
    with EmbeddedNats() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as server:
        yield server


async def migrated(settings: Settings, event_table: str = "ours") -> Settings:
    """Migrated over our own event table, or over NoETL's (tests/noetl_schema.sql)."""
    return await migrated_over(settings, event_table)


@pytest.fixture
async def on_own_nats(servers: Servers, own_nats: EmbeddedNats) -> Settings:
    """Shared PostgreSQL (own schema), this test's own nats-server."""
    settings = make_settings(
        Servers(servers.database_url, own_nats.url, "own nats"), publish_timeout=2.0
    )
    return await migrated(settings)


@pytest.fixture
async def on_shared(servers: Servers) -> Settings:
    return await migrated(make_settings(servers, publish_timeout=2.0))


# The publish paths (README: Performance): the relay's own stream takes fast-ingest
# batches (nats-server 2.14); an operator's stream may allow atomic batches only, or none.
PUBLISH_PATHS = {
    "fast-ingest": None,
    "atomic": BatchSupport(atomic=True),
    "one by one": BatchSupport(),
}


@pytest.fixture(params=list(PUBLISH_PATHS))
async def on_each_path(on_shared: Settings, nc: NATS, request: pytest.FixtureRequest) -> Settings:
    """``on_shared``, the stream made first for the publish path (or by the relay)."""
    stream = PUBLISH_PATHS[request.param]
    if request.param != "one by one":
        skip_unless_server_takes(nc, request.param)
    if stream is not None:
        await ensure_stream(nc.jetstream(), on_shared, batches=stream)
    return on_shared


@pytest.fixture(params=EVENT_TABLES)
async def on_shared_each_table(servers: Servers, request: pytest.FixtureRequest) -> Settings:
    """``on_shared``, once over our event table and once over NoETL's."""
    return await migrated(make_settings(servers, publish_timeout=2.0), request.param)


class Load:
    """Producers committing events at a steady rate, through outages (failed ones just fail)."""

    def __init__(
        self, settings: Settings, *, rate: float, producers: int = 2, executions: int = 0
    ) -> None:
        self.settings = settings
        self.rate = rate
        self.producers = producers
        # Executions the producers cycle through (0: one per producer).
        self.executions = executions or producers
        self.committed = 0
        self.failed = 0
        self._stop = anyio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for worker in range(self.producers):
                tg.start_soon(self._produce, worker)

    async def _produce(self, worker: int) -> None:
        producer = Producer(
            schema=self.settings.schema, subject_prefix=self.settings.subject_prefix
        )
        interval = self.producers / self.rate
        conn: psycopg.AsyncConnection[Any] | None = None
        executions = itertools.cycle(range(worker, self.executions, self.producers))
        try:
            while not self._stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(
                            self.settings.database_url, autocommit=True, connect_timeout=2
                        )
                    await producer.emit_event_async(
                        conn,
                        event_type="load.tick",
                        execution_id=next(executions),
                        node_id="load",
                        **event_columns(self.settings),
                    )
                    self.committed += 1
                except psycopg.OperationalError:
                    self.failed += 1  # outcome unknown or refused: verify reads the truth
                    if conn is not None:
                        await conn.close()
                    conn = None
                    await anyio.sleep(0.2)
                with anyio.move_on_after(interval * random.uniform(0.5, 1.5)):
                    await self._stop.wait()
        finally:
            # Also when a failing test cancels the load: a connection left open would
            # warn in whichever test runs next.
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()


async def assert_nothing_lost_or_doubled(
    name: str,
    settings: Settings,
    *,
    window: Window | None = None,
    within: float = 90,
    rolled_back_by_failover: bool = False,
) -> dict[str, Any]:
    """Wait until the outbox is empty, then verify the stream against the database.

    ``rolled_back_by_failover``: the test lost commits on purpose (an asynchronous
    standby promoted) and checks that class itself."""
    await wait_until(lambda: drained(settings), within=within, interval=0.2)
    nc: NATS = await connect_nats(settings)
    try:
        async with await connect_postgres(settings, autocommit=True) as conn:
            # The load writes each execution from one producer, one event at a time:
            # event id order is each key's causal order, and a reorder cannot hide.
            report = await verify(
                conn, nc.jetstream(), settings, window or Window(), strict_order=True
            )
    finally:
        await nc.close()
    summary = report.as_dict()
    RESULTS.append((name, summary))
    assert summary["lost"] == summary["duplicate"] == summary["unexpected"] == 0, summary
    assert summary["out_of_order"] == summary["unkeyed"] == summary["collided"] == 0, summary
    if not rolled_back_by_failover:
        assert summary["rolled_back_by_failover"] == 0, summary
    assert summary["pending"] == 0, summary
    assert summary["ok"] > 0, summary
    return summary


@dataclass(frozen=True, slots=True)
class Heal:
    """The moment a fault ended, and the last outbox row committed before it."""

    at: float
    last_row: int


async def healed(settings: Settings) -> Heal:
    rows = await fetch_all(
        settings,
        sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
            sql.Identifier(settings.schema, "event_outbox")
        ),
    )
    return Heal(time.monotonic(), int(rows[0][0]))


async def assert_recovered(name: str, settings: Settings, heal: Heal) -> float:
    """Wait for the backlog the fault left; fail past RECOVERY_BOUND seconds."""
    left = sql.SQL("SELECT count(*) FROM {} WHERE id <= %s").format(
        sql.Identifier(settings.schema, "event_outbox")
    )

    async def delivered() -> bool:
        return bool((await fetch_all(settings, left, (heal.last_row,)))[0][0] == 0)

    await wait_until(delivered, within=3 * RECOVERY_BOUND, interval=0.1)
    RECOVERY[name] = elapsed = time.monotonic() - heal.at
    assert elapsed <= RECOVERY_BOUND, f"{name}: backlog delivered {elapsed:.1f}s after the heal"
    return elapsed


async def all_started(*relays: RelayProcess) -> bool:
    return all(" started: database " in relay.output() for relay in relays)


async def frozen_mid_batch(settings: Settings, relay: RelayProcess) -> bool:
    """Freeze the relay; keep it frozen only if it holds claimed rows right now."""
    relay.signal(signal.SIGSTOP)
    # A COMMIT sent just before the freeze may still be on its way: give it time to
    # land before reading the session's state.
    await anyio.sleep(0.3)
    async with await connect_postgres(settings, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
            " AND application_name LIKE %s",
            (f"outbox-relay %-{relay.process.pid}",),
        )
        row = await cur.fetchone()
    if row and row[0]:
        return True
    relay.signal(signal.SIGCONT)
    return False
