"""NoETL's schema beside ours (tests/noetl_schema.sql), and what its events need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.schema import migrate

NOETL_SCHEMA_SQL = Path(__file__).with_name("noetl_schema.sql")
NOETL_CATALOG_ID = 1
# The event tables integration tests run against: the one migrate creates, NoETL's.
EVENT_TABLES = ("ours", "noetl")
# Schemas made NoETL-shaped, with the columns each event there needs (catalog_id is
# NOT NULL with a foreign key).
_required_columns: dict[str, dict[str, Any]] = {}


def event_columns(settings: Settings) -> dict[str, Any]:
    """Columns an event must carry in ``settings``' schema besides type and execution."""
    return dict(_required_columns.get(settings.schema, {}))


async def create_noetl_schema(settings: Settings) -> None:
    """NoETL's tables and id function in ``settings``' schema, before any migration."""
    schema = settings.schema
    statement = sql.SQL(NOETL_SCHEMA_SQL.read_text(encoding="utf-8")).format(
        schema=sql.Identifier(schema),
        sequence=sql.Literal(sql.Identifier(schema, "snowflake_seq").as_string()),
        catalog_id=sql.Literal(NOETL_CATALOG_ID),
    )
    async with await connect_postgres(settings) as conn:
        await conn.execute(statement)
        await conn.commit()
    _required_columns[schema] = {"catalog_id": NOETL_CATALOG_ID}


async def migrated(settings: Settings, event_table: str) -> Settings:
    """``settings``' schema migrated over our own event table or NoETL's."""
    if event_table == "noetl":
        await create_noetl_schema(settings)
    async with await connect_postgres(settings) as conn:
        await migrate(conn, settings.names, create_event_table=event_table == "ours")
    return settings
