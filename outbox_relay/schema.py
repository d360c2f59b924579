"""Versioned, idempotent migrations from ``sql/migrations``, and the relay's start-up check."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.database import connected_to
from outbox_relay.errors import ConfigError, NotMigratedError, ReadOnlyServerError
from outbox_relay.queries import ROLE_PURPOSES, SQL_DIR, Names, query, render

_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


@cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted((SQL_DIR / "migrations").iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    return tuple(found)


def latest_version() -> int:
    return migrations()[-1].version


async def _lock_schema(conn: psycopg.AsyncConnection[Any], names: Names) -> None:
    """Serialise schema changes (migrations, role grants) of concurrent runs."""
    await conn.execute(
        query("lock_migrations", names), {"lock_key": f"outbox-relay {names.schema}"}
    )


async def migrate(
    conn: psycopg.AsyncConnection[Any], names: Names, *, create_event_table: bool = False
) -> list[Migration]:
    """Apply the missing migrations in one transaction; return those applied.

    Concurrent runs are serialised by an advisory lock, so replicas may all run it.
    A first run needs the event table (NoETL's) to exist, or ``create_event_table``
    for a standalone one: NoETL's DDL would keep ours, which is not NoETL's shape.
    """
    async with conn.transaction():
        await require_writable(conn, names, "run migrate against the primary")
        await _lock_schema(conn, names)
        await conn.execute(query("create_migrations_table", names))
        cur = await conn.execute(query("applied_migrations", names))
        applied = {row[0] for row in await cur.fetchall()}
        if applied and max(applied) > latest_version():
            raise NotMigratedError(
                f"the outbox schema {names.schema!r} is at version {max(applied)}, newer than "
                f"this release knows ({latest_version()}): nothing changed; upgrade outbox-relay"
            )
        pending = [m for m in migrations() if m.version not in applied]
        if not applied and not create_event_table:
            await _require_event_table(conn, names)
        for migration in pending:
            await conn.execute(render(migration.text, names))
            await conn.execute(
                query("record_migration", names),
                {"version": migration.version, "name": migration.name},
            )
    return pending


async def require_writable(
    conn: psycopg.AsyncConnection[Any], names: Names, advice: str = ""
) -> None:
    """:class:`ReadOnlyServerError` naming the server unless it takes writes: a standby,
    or sessions read-only by default. ``advice``: what to do instead, if anything."""
    cur = await conn.execute(query("read_only", names))
    row = await cur.fetchone()
    if row and row[0]:
        where = f"PostgreSQL at {connected_to(conn)} is read-only (a standby?)"
        raise ReadOnlyServerError(f"{where}: {advice}" if advice else where)


async def _require_event_table(conn: psycopg.AsyncConnection[Any], names: Names) -> None:
    cur = await conn.execute(query("table_exists", names), {"table": names.event_table})
    row = await cur.fetchone()
    if not (row and row[0]):
        raise ConfigError(
            f"no event table {names.event_table}: apply NoETL's schema first "
            "(README: Using it from NoETL), or pass --create-event-table for a standalone "
            "one, which is not NoETL's shape"
        )


async def schema_version(conn: psycopg.AsyncConnection[Any], names: Names) -> int | None:
    """The applied version, or None when the database was never migrated."""
    cur = await conn.execute(query("table_exists", names), {"table": names.migrations_table})
    row = await cur.fetchone()
    if row is None or not row[0]:
        return None
    cur = await conn.execute(query("schema_version", names))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def ensure_migrated(conn: psycopg.AsyncConnection[Any], names: Names) -> None:
    """Raise :class:`NotMigratedError` unless the schema is exactly at our version."""
    version = await schema_version(conn, names)
    await conn.rollback()
    expected = latest_version()
    if version is None or version == 0:
        raise NotMigratedError(
            f"the database has no outbox schema {names.schema!r}: "
            "run `outbox-relay migrate` (with the same database and schema) first"
        )
    if version < expected:
        raise NotMigratedError(
            f"the outbox schema {names.schema!r} is at version {version}, this relay needs "
            f"{expected}: run `outbox-relay migrate`"
        )
    if version > expected:
        raise NotMigratedError(
            f"the outbox schema {names.schema!r} is at version {version}, newer than this "
            f"relay knows ({expected}): upgrade outbox-relay"
        )


async def grant_roles(conn: psycopg.AsyncConnection[Any], names: Names) -> list[str]:
    """Create the group roles if missing and grant them ``sql/roles.sql``; return them.

    Needs a migrated schema and a user allowed to create roles and grant on it.
    """
    await ensure_migrated(conn, names)
    roles = [names.role(purpose) for purpose in ROLE_PURPOSES]
    try:
        await _grant(conn, names, roles)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"{exc.diag.message_primary or exc}: run `outbox-relay roles` as the schema's "
            "owner (the user that ran migrate) or a superuser"
        ) from None
    return roles


async def _grant(conn: psycopg.AsyncConnection[Any], names: Names, roles: list[str]) -> None:
    async with conn.transaction():
        await _lock_schema(conn, names)
        for role in roles:
            cur = await conn.execute(query("role_exists", names), {"role": role})
            row = await cur.fetchone()
            if not (row and row[0]):
                await conn.execute(query("create_role", names, role=sql.Identifier(role)))
        await conn.execute(render((SQL_DIR / "roles.sql").read_text(encoding="utf-8"), names))
