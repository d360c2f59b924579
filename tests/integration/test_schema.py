from dataclasses import replace
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import ConfigError, NotMigratedError
from outbox_relay.producer import Producer
from outbox_relay.schema import ensure_migrated, latest_version, migrate
from tests.helpers import fetch_all
from tests.unit.test_subjects import INVALID, VALID


async def test_migrate_is_idempotent_and_recorded(unmigrated: Settings) -> None:
    async with await connect_postgres(unmigrated) as conn:
        first = await migrate(conn, unmigrated.names, create_event_table=True)
        second = await migrate(conn, unmigrated.names)
        await ensure_migrated(conn, unmigrated.names)
    assert [m.version for m in first] == list(range(1, latest_version() + 1))
    assert second == []
    rows = await fetch_all(
        unmigrated,
        sql.SQL("SELECT version FROM {}.event_outbox_migration").format(
            sql.Identifier(unmigrated.schema)
        ),
    )
    assert [r[0] for r in rows] == list(range(1, latest_version() + 1))


async def test_concurrent_migrations_serialise(unmigrated: Settings) -> None:
    applied: list[int] = []

    async def run() -> None:
        async with await connect_postgres(unmigrated) as conn:
            applied.append(len(await migrate(conn, unmigrated.names, create_event_table=True)))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(run)
    assert sorted(applied) == [0, 0, 0, latest_version()]


async def test_unmigrated_database_is_reported(unmigrated: Settings) -> None:
    async with await connect_postgres(unmigrated) as conn:
        with pytest.raises(NotMigratedError, match="run `outbox-relay migrate`"):
            await ensure_migrated(conn, unmigrated.names)


@pytest.mark.parametrize(
    ("version", "message"), [(0, "run `outbox-relay migrate`"), (999, "upgrade outbox-relay")]
)
async def test_wrong_schema_version_is_reported(
    outbox: Settings, version: int, message: str
) -> None:
    async with await connect_postgres(outbox) as conn:
        table = sql.SQL("{}.event_outbox_migration").format(sql.Identifier(outbox.schema))
        await conn.execute(sql.SQL("DELETE FROM {}").format(table))
        if version:
            await conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, 'future')").format(table), (version,)
            )
        await conn.commit()
        with pytest.raises(NotMigratedError, match=message):
            await ensure_migrated(conn, outbox.names)


async def test_an_existing_noetl_event_table_is_used_as_it_is(unmigrated: Settings) -> None:
    # NoETL's own table, not partitioned and with a column of its own.
    async with await connect_postgres(unmigrated) as conn:
        await conn.execute(
            sql.SQL(
                "CREATE SCHEMA {s}; CREATE TABLE {s}.event ("
                " execution_id bigint, event_id bigint, event_type varchar, node_name varchar,"
                " context jsonb, worker_id text, created_at timestamp DEFAULT now(),"
                " PRIMARY KEY (execution_id, event_id))"
            ).format(s=sql.Identifier(unmigrated.schema))
        )
        await conn.commit()
        await migrate(conn, unmigrated.names)
    with psycopg.connect(unmigrated.database_url) as db:
        producer = Producer(schema=unmigrated.schema, subject_prefix=unmigrated.subject_prefix)
        event_id = producer.emit_event(
            db, event_type="command.issued", execution_id=1, worker_id="w-1"
        )
    rows = await fetch_all(
        unmigrated,
        sql.SQL("SELECT convert_from(payload, 'UTF8')::jsonb FROM {}.event_outbox").format(
            sql.Identifier(unmigrated.schema)
        ),
    )
    assert rows[0][0]["worker_id"] == "w-1"
    assert rows[0][0]["event_id"] == event_id
    kinds = await fetch_all(
        unmigrated,
        "SELECT relkind FROM pg_class WHERE oid = %s::regclass",
        (f'"{unmigrated.schema}"."event"',),
    )
    assert kinds == [("r",)]  # left as it was: not partitioned, no partition added


@pytest.mark.parametrize("subject", VALID)
async def test_database_accepts_what_the_python_check_accepts(
    db: psycopg.Connection[Any], outbox: Settings, subject: str
) -> None:
    db.execute(
        sql.SQL("SELECT {}.event_outbox_enqueue(%s, %s, %s)").format(sql.Identifier(outbox.schema)),
        (subject, b"x", "id-1"),
    )


@pytest.mark.parametrize("subject", [s for s in INVALID if "\x00" not in s])
async def test_database_refuses_what_the_python_check_refuses(
    db: psycopg.Connection[Any], outbox: Settings, subject: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="event_outbox_subject_valid"):
        db.execute(
            sql.SQL("SELECT {}.event_outbox_enqueue(%s, %s, %s)").format(
                sql.Identifier(outbox.schema)
            ),
            (subject, b"x", "id-1"),
        )


async def test_the_outbox_table_carries_queue_autovacuum_settings(outbox: Settings) -> None:
    rows = await fetch_all(
        outbox,
        "SELECT unnest(reloptions) FROM pg_class WHERE oid = %s::regclass",
        (outbox.names.identifiers()["outbox_table"].as_string(),),
    )
    options = dict(row[0].split("=") for row in rows)
    assert options["autovacuum_vacuum_scale_factor"] == "0"
    assert options["autovacuum_vacuum_threshold"] == "10000"
    assert options["autovacuum_vacuum_cost_delay"] == "0"


async def test_sslmode_and_friends_reach_libpq_untouched(outbox: Settings) -> None:
    for mode in ("disable", "prefer"):
        url = make_conninfo(outbox.database_url, sslmode=mode, sslcompression="0")
        async with await connect_postgres(replace(outbox, database_url=url)) as conn:
            # libpq ignores sslmode on a Unix socket, but it got it all the same.
            used = {o.keyword.decode(): o.val for o in conn.pgconn.info}
            assert used["sslmode"] == mode.encode()
            cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            row = await cur.fetchone()
            if mode == "disable":
                assert row == (False,)


async def test_a_first_migrate_without_noetls_event_table_refuses_unless_asked(
    unmigrated: Settings,
) -> None:
    # NoETL's DDL (CREATE TABLE IF NOT EXISTS) would keep a table of ours as it is.
    async with await connect_postgres(unmigrated) as conn:
        with pytest.raises(ConfigError, match=r"no event table .*--create-event-table"):
            await migrate(conn, unmigrated.names)
    exists = "SELECT to_regclass(%s) IS NOT NULL"
    assert await fetch_all(unmigrated, exists, (unmigrated.names.event_table,)) == [(False,)]
    async with await connect_postgres(unmigrated) as conn:
        assert await migrate(conn, unmigrated.names, create_event_table=True)
    assert await fetch_all(unmigrated, exists, (unmigrated.names.event_table,)) == [(True,)]
