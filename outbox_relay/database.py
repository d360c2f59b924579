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
from outbox_relay.errors import ConfigError, ReadOnlyServerError, ServerUnavailableError
from outbox_relay.queries import query

# A server that vanishes without a RST (a network partition) must fail the connection
# within seconds, not after the kernel's defaults (two hours idle, ~15 minutes of
# retransmissions): by then PostgreSQL has long released the claim's locks.
# Keepalives cover an idle connection, tcp_user_timeout one with unanswered data.
# Any of them in the connection string wins.
TCP_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms
}
# libpq's words when target_session_attrs=read-write found only standbys.
_READ_ONLY_REFUSALS = ("session is read-only", "hot standby mode")


async def connect_postgres(
    settings: Settings, *, autocommit: bool = False, application_name: str = "outbox-relay"
) -> psycopg.AsyncConnection[Any]:
    """Connect, or raise :class:`ServerUnavailableError` with the reason.

    ``application_name`` applies unless the connection string or ``PGAPPNAME`` sets one.
    """
    try:
        given = conninfo_to_dict(settings.database_url)
    except psycopg.ProgrammingError:
        # Not echoed: a malformed string may still hold a password.
        raise ConfigError(
            "the database URL is neither a libpq URL (postgresql://user@host:5432/dbname) "
            "nor key=value pairs: check --database-url / OUTBOX_DATABASE_URL"
        ) from None
    extra: dict[str, Any] = {k: v for k, v in TCP_DEFAULTS.items() if k not in given}
    if "application_name" not in given and not os.environ.get("PGAPPNAME"):
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
        unavailable = (
            ReadOnlyServerError
            if any(words in text for words in _READ_ONLY_REFUSALS)
            else ServerUnavailableError
        )
        raise unavailable(
            f"cannot connect to PostgreSQL at {describe_database(settings.database_url)} "
            f"({reason}): check --database-url / OUTBOX_DATABASE_URL or the PG* variables"
        ) from exc
    set_json_loads(orjson.loads, conn)
    try:
        await conn.execute(query("no_jit", settings.names))
        if not autocommit:
            await conn.commit()
    except BaseException:
        await conn.close()
        raise
    return conn


def connected_to(conn: psycopg.AsyncConnection[Any]) -> str:
    """``user@host:port/dbname`` of an open connection: the target as libpq resolved it."""
    info = conn.info
    return f"{info.user}@{info.host}:{info.port}/{info.dbname}"
