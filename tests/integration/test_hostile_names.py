"""Configurable names reach PostgreSQL only as quoted identifiers, whatever they hold."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from nats.aio.client import Client as NATS
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.queries import ROLE_PURPOSES
from outbox_relay.schema import grant_roles, migrate
from tests.conftest import drop, make_settings
from tests.helpers import drained, emit_events, lag, running_relay, stream_count, wait_until
from tests.servers import Servers

HOSTILE = [
    'we"ird',
    "x');DROP SCHEMA public;--",
    "spa ce.dot",
    "Ünï-cödé",
]


@pytest.fixture(params=HOSTILE)
async def hostile(request: pytest.FixtureRequest, servers: Servers) -> AsyncIterator[Settings]:
    # Unique per run, still hostile: a test database may be shared.
    schema = f"{request.param}{uuid.uuid4().hex[:6]}"
    settings = make_settings(servers, schema=schema)
    yield settings
    await drop(settings)
    async with await connect_postgres(settings, autocommit=True) as admin:
        for purpose in ROLE_PURPOSES:
            role = sql.Identifier(settings.names.role(purpose))
            await admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))


async def test_everything_works_in_a_schema_with_a_hostile_name(
    hostile: Settings, nc: NATS
) -> None:
    async with await connect_postgres(hostile) as conn:
        await migrate(conn, hostile.names, create_event_table=True)
        await conn.commit()
        await grant_roles(conn, hostile.names)
    # LISTEN on the derived channel works, else this waits for the poll and fails.
    slow_poll = replace(hostile, poll_interval=60.0, ordered=False)
    async with running_relay(slow_poll):
        emit_events(hostile, 5)
        await wait_until(lambda: drained(hostile), within=10)
    assert await stream_count(nc, hostile) == 5
    assert (await lag(hostile)).dead_letters == 0
    async with await connect_postgres(hostile, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'public'")
        assert await cur.fetchone() == (1,)
