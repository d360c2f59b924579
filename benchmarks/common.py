"""What every benchmark needs: servers, and an outbox of its own on them."""

from __future__ import annotations

import os
import uuid
from contextlib import ExitStack

from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.embedded import EmbeddedNats, EmbeddedPostgres
from outbox_relay.schema import migrate


def servers(stack: ExitStack) -> tuple[str, str]:
    """``OUTBOX_DATABASE_URL`` / ``OUTBOX_NATS_URL`` when set, else embedded servers."""
    database_url = (
        os.environ.get("OUTBOX_DATABASE_URL") or stack.enter_context(EmbeddedPostgres()).url
    )
    nats_url = os.environ.get("OUTBOX_NATS_URL") or stack.enter_context(EmbeddedNats()).url
    return database_url, nats_url


async def fresh_outbox(database_url: str, nats_url: str) -> Settings:
    """A migrated schema and a stream name nothing else uses."""
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        database_url=database_url,
        nats_urls=(nats_url,),
        schema=f"bench_{suffix}",
        stream=f"bench_{suffix}",
        subject_prefix=f"bench_{suffix}.events",
    )
    async with await connect_postgres(settings) as conn:
        await migrate(conn, settings.names)
    return settings


async def shipped_trigger(settings: Settings) -> str:
    """Our trigger function's definition, as migrated, to restore between modes."""
    async with await connect_postgres(settings, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_get_functiondef(%s::regproc)",
            (sql.Identifier(settings.schema, "event_outbox_notify").as_string(),),
        )
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])
