from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.jetstream import batch_support, connect_nats, server_version
from outbox_relay.schema import migrate
from tests.noetl import migrated
from tests.servers import Servers, test_servers


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    with test_servers() as found:
        yield found


def pytest_report_header(config: pytest.Config) -> str:
    import os

    given = [
        v
        for v in ("OUTBOX_TEST_DATABASE_URL", "OUTBOX_TEST_NATS_URL", "OUTBOX_TEST_SERVERS")
        if os.environ.get(v)
    ]
    return f"outbox-relay servers: {', '.join(given) or 'embedded'}"


def make_settings(servers: Servers, **overrides: Any) -> Settings:
    """Settings with names of their own, so tests never see each other's rows or messages."""
    suffix = uuid.uuid4().hex[:10]
    defaults: dict[str, Any] = {
        "database_url": servers.database_url,
        "nats_urls": (servers.nats_url,),
        "schema": f"test_{suffix}",
        "stream": f"test_{suffix}",
        "subject_prefix": f"test_{suffix}.events",
        "poll_interval": 1.0,
        "publish_timeout": 3.0,
        "retry_backoff": 0.05,
        "retry_backoff_max": 0.2,
        "connect_timeout": 5.0,
        # Many relays run side by side; a test that serves metrics picks its own port.
        "metrics_port": 0,
        "lag_interval": 0.2,
    }
    return Settings(**{**defaults, **overrides})


@pytest.fixture
async def unmigrated(servers: Servers) -> AsyncIterator[Settings]:
    """Settings for a schema and stream that do not exist yet; dropped afterwards."""
    settings = make_settings(servers)
    yield settings
    await drop(settings)


@pytest.fixture
async def outbox(unmigrated: Settings) -> Settings:
    """A migrated schema of its own (its stream is created by the first relay)."""
    async with await connect_postgres(unmigrated) as conn:
        await migrate(conn, unmigrated.names, create_event_table=True)
    return unmigrated


@pytest.fixture
async def noetl_outbox(unmigrated: Settings) -> Settings:
    """:func:`outbox` over a NoETL-shaped schema (tests/noetl_schema.sql)."""
    return await migrated(unmigrated, "noetl")


async def drop(settings: Settings) -> None:
    async with await connect_postgres(settings, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(settings.schema))
        )
    nc = await connect_nats(settings)
    try:
        await nc.jetstream().delete_stream(settings.stream)
    except NotFoundError:
        pass
    finally:
        await nc.close()


@pytest.fixture
async def nc(servers: Servers) -> AsyncIterator[NATS]:
    client = await connect_nats(make_settings(servers))
    yield client
    await client.close()


def skip_unless_server_takes(nc: NATS, kind: str) -> None:
    """Skip where the test servers' nats-server predates ``kind`` batch publish
    ("atomic" or "fast-ingest"): the embedded one (the suite's default, and .ci/run's
    first pass) takes both."""
    server, since = batch_support(nc), {"atomic": "2.12.1", "fast-ingest": "2.14"}[kind]
    if not (server.fast if kind == "fast-ingest" else server.atomic):
        pytest.skip(
            f"nats-server {'.'.join(map(str, server_version(nc)))} predates {kind} batch "
            f"publish ({since}); the embedded nats-server runs these tests"
        )


@pytest.fixture
def atomic_server(nc: NATS) -> None:
    skip_unless_server_takes(nc, "atomic")


@pytest.fixture
def fast_server(nc: NATS) -> None:
    skip_unless_server_takes(nc, "fast-ingest")


@pytest.fixture
def db(outbox: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A plain synchronous connection, as an application would hold."""
    with psycopg.connect(outbox.database_url) as conn:
        yield conn
