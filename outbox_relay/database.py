"""PostgreSQL connections, with start-up errors a person can act on."""

from __future__ import annotations

import os
from typing import Any

import anyio
import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads

from outbox_relay.config import Settings, describe_database
from outbox_relay.errors import ServerUnavailableError


async def connect_postgres(
    settings: Settings, *, autocommit: bool = False, application_name: str = "outbox-relay"
) -> psycopg.AsyncConnection[Any]:
    """Connect, or raise :class:`ServerUnavailableError` with the reason.

    ``application_name`` applies unless the connection string or ``PGAPPNAME`` sets one.
    """
    extra: dict[str, Any] = {}
    if "application_name" not in _params(settings.database_url) and not os.environ.get("PGAPPNAME"):
        extra["application_name"] = application_name
    try:
        with anyio.fail_after(settings.connect_timeout):
            conn = await psycopg.AsyncConnection.connect(
                settings.database_url,
                autocommit=autocommit,
                connect_timeout=max(1, int(settings.connect_timeout)),
                **extra,
            )
    except (psycopg.OperationalError, TimeoutError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else "timed out"
        raise ServerUnavailableError(
            f"cannot connect to PostgreSQL at {describe_database(settings.database_url)} "
            f"({reason}): check --database-url / OUTBOX_DATABASE_URL or the PG* variables"
        ) from exc
    set_json_loads(orjson.loads, conn)
    return conn


def connected_to(conn: psycopg.AsyncConnection[Any]) -> str:
    """``user@host:port/dbname`` of an open connection: the target as libpq resolved it."""
    info = conn.info
    return f"{info.user}@{info.host}:{info.port}/{info.dbname}"


def _params(conninfo: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:  # malformed: connect() reports it
        return {}
