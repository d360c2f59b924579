"""Least-privilege roles (sql/roles.sql): each kind of user can do its job and no more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.queries import ROLE_PURPOSES
from outbox_relay.schema import grant_roles
from tests.helpers import drained, producer_for, running_relay, wait_until


@pytest.fixture
async def logins(outbox: Settings) -> AsyncIterator[dict[str, Settings]]:
    """Settings connecting as a fresh login role per purpose, each granted its group role."""
    async with await connect_postgres(outbox) as conn:
        groups = await grant_roles(conn, outbox.names)
        await conn.commit()
    users: dict[str, Settings] = {}
    async with await connect_postgres(outbox, autocommit=True) as admin:
        for purpose, group in zip(ROLE_PURPOSES, groups, strict=True):
            login = f"{group}_login"
            await admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(login), sql.Identifier(group)
                )
            )
            users[purpose] = replace(
                outbox, database_url=make_conninfo(outbox.database_url, user=login)
            )
    yield users
    async with await connect_postgres(outbox, autocommit=True) as admin:
        for role in [*(f"{g}_login" for g in groups), *groups]:
            await admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            await admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _table(settings: Settings, name: str) -> sql.Composable:
    return settings.names.identifiers()[name]


def _refused(settings: Settings, statement: sql.Composed) -> None:
    with (
        psycopg.connect(settings.database_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement)


async def test_producer_may_only_write(logins: dict[str, Settings]) -> None:
    producer = logins["producer"]
    with psycopg.connect(producer.database_url) as conn:
        producer_for(producer).emit_event(conn, event_type="test.role", execution_id=1)
    outbox = _table(producer, "outbox_table")
    _refused(producer, sql.SQL("SELECT payload FROM {}").format(outbox))
    _refused(producer, sql.SQL("DELETE FROM {}").format(outbox))
    _refused(producer, sql.SQL("SELECT * FROM {}").format(_table(producer, "dead_letter_table")))


async def test_relay_works_under_its_role_and_cannot_read_events(
    logins: dict[str, Settings],
) -> None:
    relay, producer = logins["relay"], logins["producer"]
    with psycopg.connect(producer.database_url) as conn:
        for i in range(5):
            producer_for(producer).emit_event(conn, event_type="test.role", execution_id=i)
    async with running_relay(relay):
        await wait_until(lambda: drained(relay))
    _refused(relay, sql.SQL("SELECT * FROM {}").format(_table(relay, "event_table")))
    _refused(
        relay,
        sql.SQL("INSERT INTO {} (event_id, subject, payload) VALUES ('x', 'a.b', '')").format(
            _table(relay, "outbox_table")
        ),
    )


async def test_roles_can_be_granted_again(outbox: Settings, logins: dict[str, Settings]) -> None:
    async with await connect_postgres(outbox) as conn:
        assert await grant_roles(conn, outbox.names) == [
            outbox.names.role(p) for p in ROLE_PURPOSES
        ]
