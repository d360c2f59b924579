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
from outbox_relay.queries import (
    KEY_PARTITIONS,
    MEMBER_LOCK_CLASS,
    PARTITION_LOCK_CLASS,
    ROLE_PURPOSES,
)
from outbox_relay.schema import grant_roles
from outbox_relay.store import OutboxStore, RetryPolicy
from tests.acceptance.cli import env_for, outbox_relay
from tests.helpers import drained, producer_for, running_relay, wait_until
from tests.noetl import NOETL_CATALOG_ID


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


def _forge(settings: Settings) -> sql.Composed:
    """An outbox row with a chosen id and retry bookkeeping, written past the producer API."""
    return sql.SQL(
        "INSERT INTO {} (id, event_id, subject, payload, attempts, next_attempt_at)"
        " OVERRIDING SYSTEM VALUE VALUES (9000000000, 'forged', 'a.b', '', -5, 'infinity')"
    ).format(_table(settings, "outbox_table"))


async def test_producer_cannot_write_the_outbox_table_directly(
    logins: dict[str, Settings],
) -> None:
    producer = logins["producer"]
    _refused(producer, _forge(producer))
    _refused(
        producer,
        sql.SQL("INSERT INTO {} (event_id, subject, payload) VALUES ('x', 'a.b', '')").format(
            _table(producer, "outbox_table")
        ),
    )
    # The way in is the enqueue function, which writes as its owner.
    with psycopg.connect(producer.database_url) as conn:
        producer_for(producer).enqueue(conn, subject="a.b", payload=b"x", msg_id="m-1")


async def test_roles_leave_noetls_own_objects_alone(noetl_outbox: Settings) -> None:
    settings = noetl_outbox
    schema = sql.Identifier(settings.schema)
    app = f"{settings.schema}_app"  # NoETL's application user, with the grants NoETL gives it
    async with await connect_postgres(settings, autocommit=True) as admin:
        await admin.execute(
            sql.SQL(
                "CREATE ROLE {app} LOGIN; GRANT USAGE ON SCHEMA {s} TO {app};"
                " GRANT ALL ON {s}.event, {s}.catalog, {s}.outbox TO {app};"
                " GRANT ALL ON ALL SEQUENCES IN SCHEMA {s} TO {app}"
            ).format(app=sql.Identifier(app), s=schema)
        )
    async with await connect_postgres(settings) as conn:
        groups = await grant_roles(conn, settings.names)
        await conn.commit()
    try:
        as_app = make_conninfo(settings.database_url, user=app)
        with psycopg.connect(as_app) as conn:
            # NoETL's own inserts: ids from its function, its outbox, its catalog.
            conn.execute(
                sql.SQL(
                    "INSERT INTO {s}.event (event_id, execution_id, catalog_id, event_type,"
                    " node_name, status, created_at)"
                    " VALUES ({s}.snowflake_id(), {s}.snowflake_id(), %s, 'playbook.initialized',"
                    " 'start', 'STARTED', now())"
                ).format(s=schema),
                (NOETL_CATALOG_ID,),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {s}.outbox (execution_id, event_id, subject, payload)"
                    " VALUES (1, {s}.snowflake_id(), 'noetl.events.x', '{{}}')"
                ).format(s=schema)
            )
            conn.execute(
                sql.SQL("INSERT INTO {s}.catalog (path, kind) VALUES ('p', 'Playbook')").format(
                    s=schema
                )
            )
        # Our objects are ours: the application user was given none of them.
        _refused(replace(settings, database_url=as_app), _forge(settings))
    finally:
        async with await connect_postgres(settings, autocommit=True) as admin:
            for role in [app, *groups]:
                await admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                await admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_producer_holding_the_membership_lock_too_is_seen_as_a_squatter(
    outbox: Settings, logins: dict[str, Settings]
) -> None:
    """A role that may only produce takes the relays' membership lock and then every
    partition: it used to count as a relay (holding 0 partitions) and stay unseen
    while keyed rows waited. What a relay must be able to do (delete outbox rows)
    tells it apart, whatever advisory locks it takes."""
    lock_object = outbox.names.lock_object
    with psycopg.connect(
        logins["producer"].database_url, autocommit=True, application_name="squatter"
    ) as squatter:
        squatter.execute("SELECT pg_advisory_lock_shared(%s, %s)", (MEMBER_LOCK_CLASS, lock_object))
        for partition in range(KEY_PARTITIONS):
            squatter.execute(
                "SELECT pg_advisory_lock(%s, %s)", (PARTITION_LOCK_CLASS + partition, lock_object)
            )
        async with running_relay(logins["relay"], "victim") as relay:

            def squatted() -> float | None:
                return relay.metrics.registry.get_sample_value(
                    "outbox_relay_partitions_held_by_non_relays"
                )

            await wait_until(lambda: _is(squatted(), KEY_PARTITIONS), within=5)
            async with await connect_postgres(logins["relay"]) as conn:
                assert await OutboxStore(outbox.names, RetryPolicy()).count_relays(conn) == 1
        check = await outbox_relay("check", env=env_for(outbox))
    assert check.returncode == 1
    assert "application squatter" in check.stderr
    assert "64 key partitions without being a relay" in check.stderr


async def _is(value: float | None, expected: float) -> bool:
    return value == expected


async def test_roles_by_a_user_who_may_not_grant_says_who_may(
    outbox: Settings, logins: dict[str, Settings]
) -> None:
    """It used to end in a raw `permission denied for sequence ...`, exit 1."""
    result = await outbox_relay("roles", env=env_for(logins["operator"]))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "permission denied" in result.stderr
    assert "as the schema's owner (the user that ran migrate) or a superuser" in result.stderr
    assert result.stderr.count("\n") == 1
