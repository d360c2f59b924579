"""Relays of other databases and schemas on the same PostgreSQL server change nothing.

Each test used to run in a schema of its own on a server of its own, which hid that
relay membership and the idle lock were read from pg_locks for the whole server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from functools import partial

import anyio
import anyio.to_thread
import psycopg
from nats.aio.client import Client as NATS
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.config import Settings
from outbox_relay.relay import Relay
from outbox_relay.verify import Window, verify
from tests.conftest import drop, make_settings
from tests.faults.conftest import migrated
from tests.helpers import drained, producer_for, running_relay, wait_until
from tests.servers import Servers


@asynccontextmanager
async def other_database(servers: Servers) -> AsyncIterator[str]:
    """A second database on the same server; its URL."""
    name = f"neighbour_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(servers.database_url, dbname=name)
    finally:
        with psycopg.connect(servers.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@asynccontextmanager
async def neighbours(servers: Servers, ours: Settings) -> AsyncIterator[list[Settings]]:
    """Three relays in another database under our schema name, two in another schema of
    our database, all caught up and asleep."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(other_database(servers))
        same_name = replace(make_settings(servers), database_url=url, schema=ours.schema)
        other_schema = make_settings(servers)
        for settings in (same_name, other_schema):
            await migrated(settings)
            stack.push_async_callback(drop, settings)
        for n in range(3):
            await stack.enter_async_context(running_relay(same_name, f"neighbour-db-{n}"))
        for n in range(2):
            await stack.enter_async_context(running_relay(other_schema, f"neighbour-schema-{n}"))
        await anyio.sleep(1)  # caught up: asleep, holding their idle locks
        yield [same_name, other_schema]


def emit_over_keys(settings: Settings, executions: int) -> None:
    producer = producer_for(settings)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for execution_id in range(executions):
            producer.emit_event(conn, event_type="step.done", execution_id=execution_id)


def owned_partitions(relay: Relay) -> float:
    return relay.metrics.registry.get_sample_value("outbox_relay_partitions_owned") or 0.0


async def test_a_lone_relay_owns_every_partition_beside_other_databases_relays(
    servers: Servers, outbox: Settings, nc: NATS
) -> None:
    ours = replace(outbox, poll_interval=60.0)
    async with neighbours(servers, ours) as others, running_relay(ours, "ours") as relay:
        await wait_until(lambda: _owns_all(relay), within=5)
        started = time.monotonic()
        emit_over_keys(ours, 100)  # 100 executions: keys in every partition
        await wait_until(lambda: drained(ours), within=10)
        assert time.monotonic() - started < 10
        for settings in others:  # and the neighbours still deliver their own
            emit_over_keys(settings, 20)
            await wait_until(partial(drained, settings), within=10)
    async with await psycopg.AsyncConnection.connect(ours.database_url, autocommit=True) as conn:
        report = await verify(conn, nc.jetstream(), ours, Window())
    assert report.ok == 100
    assert report.clean


async def test_a_producer_in_flight_wakes_the_relay_though_other_databases_relays_sleep(
    servers: Servers, outbox: Settings
) -> None:
    """The idle hand-off (sql/migrations/0002) reads its own database's locks only: a
    sleeping relay elsewhere must not make ours sleep through an uncommitted producer."""
    ours = replace(outbox, poll_interval=60.0, ordered=False)
    producer = producer_for(ours)
    async with neighbours(servers, ours), running_relay(ours, "ours"):
        for _ in range(3):
            with psycopg.connect(ours.database_url) as conn:
                producer.emit_event(conn, event_type="slow.commit", execution_id=1)
                await anyio.sleep(0.5)  # our relay goes idle while this is open
                conn.commit()
            started = time.monotonic()
            await wait_until(lambda: drained(ours), within=5, interval=0.01)
            assert time.monotonic() - started < 1.5


async def _owns_all(relay: Relay) -> bool:
    return owned_partitions(relay) == 64
