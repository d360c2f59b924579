"""Peer relays from PyPI, each moving the same preloaded rows into the same kind of stream.

Install them into the benchmark environment first (``pip install -e '.[bench]'``):

- ``txoutbox`` (asyncpg storage, a ``js.publish`` per message, ``concurrency`` in flight),
- ``pgqueuer`` (``QueueManager.run(mode=drain)`` with a publishing entrypoint),
- ``nats-outbox`` (its ``PollingRelay`` and ``NatsPublisher``).

Each gets a database of its own, created for the run and dropped after it, and its
own settings at the tuned values below (their defaults are slower still; the README
of the benchmarks says which). Every drain is timed the same way as ours: from the
relay's start until the stream holds every row.
"""

# Each peer is imported inside its drain: peers are optional, absent from the test env.
# ruff: noqa: PLC0415

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import nats
import psycopg
from nats.js import JetStreamContext
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.jetstream import batch_support, ensure_stream

PeerDrain = Callable[[str, str, Settings, int, int], Awaitable[float]]

# The peers log every message at INFO; that is their cost, not the benchmark's to pay.
logging.getLogger().setLevel(logging.WARNING)

TXOUTBOX_BATCH = 1000
TXOUTBOX_CONCURRENCY = 200
PGQUEUER_BATCH = 5000
NATS_OUTBOX_BATCH = 1000


def with_database(url: str, name: str) -> str:
    """``url`` (a ``postgresql://`` URL) pointed at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@asynccontextmanager
async def scratch_database(url: str) -> AsyncIterator[str]:
    """A database created for one peer run and dropped after it."""
    name = f"bench_peer_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_database(url, name)
        finally:
            await admin.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def stream_holds(js: JetStreamContext, stream: str, rows: int) -> None:
    while (held := (await js.stream_info(stream)).state.messages) < rows:  # noqa: ASYNC110
        await anyio.sleep(0.01)
    # Every row once, no more: a relay that publishes twice does not win by it.
    assert held == rows, f"stream holds {held} messages for {rows} rows"


async def timed_drain(
    nats_url: str,
    settings: Settings,
    rows: int,
    relay: Callable[[JetStreamContext], Coroutine[Any, Any, object]],
) -> float:
    """Rows/s from starting ``relay`` until the stream holds ``rows`` messages."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        # As the relay creates it; to the peers, allowing batches changes nothing.
        await ensure_stream(js, settings, batches=batch_support(nc))
        async with anyio.create_task_group() as tg:
            started = anyio.current_time()
            tg.start_soon(relay, js)
            await stream_holds(js, settings.stream, rows)
            elapsed = anyio.current_time() - started
            tg.cancel_scope.cancel()
        await js.delete_stream(settings.stream)
    finally:
        await nc.close()
    return rows / elapsed


def subject(settings: Settings) -> str:
    return f"{settings.subject_prefix}.bench"


async def txoutbox_drain(
    database_url: str, nats_url: str, settings: Settings, rows: int, payload: int
) -> float:
    return await _txoutbox(database_url, nats_url, settings, rows, payload, tuned=True)


async def txoutbox_defaults_drain(
    database_url: str, nats_url: str, settings: Settings, rows: int, payload: int
) -> float:
    """txoutbox as its README configures it: batches of 50, 10 in flight."""
    return await _txoutbox(database_url, nats_url, settings, rows, payload, tuned=False)


async def _txoutbox(
    database_url: str, nats_url: str, settings: Settings, rows: int, payload: int, *, tuned: bool
) -> float:
    from txoutbox import OutboxMessage, Relay, RelayConfig
    from txoutbox.adapters.postgres import PostgresStorage

    async with scratch_database(database_url) as url:
        storage = await PostgresStorage.connect(url, strict_ordering=False, delete_on_ack=True)
        try:
            await storage.create_schema()
            async with storage.pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO outbox (topic, payload)"
                    " SELECT $1, convert_to(repeat('x', $2), 'UTF8') FROM generate_series(1, $3)",
                    subject(settings),
                    payload,
                    rows,
                )
                await conn.execute("VACUUM ANALYZE outbox")

            async def relay(js: JetStreamContext) -> None:
                async def publish(message: OutboxMessage) -> None:
                    await js.publish(
                        message.topic, message.payload, headers={"Nats-Msg-Id": str(message.id)}
                    )

                config = (
                    RelayConfig(batch_size=TXOUTBOX_BATCH, concurrency=TXOUTBOX_CONCURRENCY)
                    if tuned
                    else RelayConfig()
                )
                await Relay(storage, publish, config=config).run()

            return await timed_drain(nats_url, settings, rows, relay)
        finally:
            await storage.close()


async def pgqueuer_drain(
    database_url: str, nats_url: str, settings: Settings, rows: int, payload: int
) -> float:
    from pgqueuer import Job, PsycopgDriver, Queries, QueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    async with (
        scratch_database(database_url) as url,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
    ):
        driver = PsycopgDriver(conn)
        queries = Queries(driver)
        await queries.install()
        data = b"x" * payload
        for start in range(0, rows, 10_000):
            count = min(10_000, rows - start)
            await queries.enqueue(["publish"] * count, [data] * count, [0] * count)

        async def relay(js: JetStreamContext) -> None:
            manager = QueueManager(queries)

            async def publish(job: Job) -> None:
                assert job.payload is not None
                await js.publish(
                    subject(settings), job.payload, headers={"Nats-Msg-Id": str(job.id)}
                )

            # Registered by a call, not as a decorator: where pgqueuer is not installed
            # (the test environment) mypy sees it as untyped.
            manager.entrypoint("publish")(publish)
            await manager.run(batch_size=PGQUEUER_BATCH, mode=QueueExecutionMode.drain)

        return await timed_drain(nats_url, settings, rows, relay)


async def nats_outbox_drain(
    database_url: str, nats_url: str, settings: Settings, rows: int, payload: int
) -> float:
    from nats_outbox.core.models import Base
    from nats_outbox.publishers.nats_publisher import NatsPublisher
    from nats_outbox.relay.polling import PollingRelay
    from nats_outbox.settings import OutboxSettings
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    async with scratch_database(database_url) as url:
        engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                now = datetime.now(UTC)
                await conn.execute(
                    text(
                        "INSERT INTO outbox_events (event_id, subject, headers, payload, status,"
                        " retry_count, created_at, updated_at, scheduled_at)"
                        " SELECT gen_random_uuid(), :subject, '{}', jsonb_build_object('x',"
                        " repeat('x', :filler)), 'pending', 0, :now, :now, :now"
                        " FROM generate_series(1, :rows)"
                    ),
                    {"subject": subject(settings), "filler": payload - 8, "rows": rows, "now": now},
                )

            async def relay(js: JetStreamContext) -> None:
                outbox_settings = OutboxSettings(
                    database_url=str(engine.url.render_as_string(hide_password=False)),
                    nats_url=nats_url,
                    batch_size=NATS_OUTBOX_BATCH,
                    polling_interval=timedelta(milliseconds=50).total_seconds(),
                )
                await PollingRelay(
                    async_sessionmaker(engine, expire_on_commit=False),
                    NatsPublisher(js),
                    outbox_settings,
                ).start()

            return await timed_drain(nats_url, settings, rows, relay)
        finally:
            await engine.dispose()


# Name in the tables -> the module it needs, and its drain.
PEERS: dict[str, tuple[str, PeerDrain]] = {
    "txoutbox": ("txoutbox", txoutbox_drain),
    "txoutbox-defaults": ("txoutbox", txoutbox_defaults_drain),
    "pgqueuer": ("pgqueuer", pgqueuer_drain),
    "nats-outbox": ("nats_outbox", nats_outbox_drain),
}


def installed() -> dict[str, PeerDrain]:
    """The peers importable here; the others are skipped with a note."""
    available = {}
    for name, (module, drain) in PEERS.items():
        try:
            __import__(module)
        except ImportError:
            print(f"  {name} not installed (pip install -e '.[bench]'): skipped")
            continue
        available[name] = drain
    return available
