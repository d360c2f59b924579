"""Rows that could stop or hurt delivery: refused at write time, or that row's failure."""

from dataclasses import replace
from typing import Any

import psycopg
import pytest
from nats.aio.client import Client as NATS
from psycopg import sql
from psycopg.types.json import Jsonb

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import (
    ConfigError,
    InvalidHeadersError,
    InvalidSubjectError,
    InvalidValueError,
    PayloadTooLargeError,
)
from outbox_relay.queries import query, render
from outbox_relay.replay import ReplaySelection, replay
from outbox_relay.schema import migrate, migrations
from outbox_relay.subjects import MAX_SUBJECT_BYTES
from tests.helpers import (
    assert_exactly_once,
    drained,
    emit_events,
    fetch_all,
    producer_for,
    running_relay,
    stream_messages,
    wait_until,
)

# Written as the README tells producers in other languages to.
ENQUEUE = "SELECT {}.event_outbox_enqueue(subject => %s, payload => %s, event_id => %s, headers => %s, ordering_key => %s)"  # noqa: E501


def enqueue_sql(
    conn: psycopg.Connection[Any],
    settings: Settings,
    subject: str,
    msg_id: str,
    *,
    headers: Any = None,
    ordering_key: str | None = None,
) -> None:
    conn.execute(
        sql.SQL(ENQUEUE).format(sql.Identifier(settings.schema)),
        (subject, b"x", msg_id, None if headers is None else Jsonb(headers), ordering_key),
    )


@pytest.mark.parametrize(
    ("row", "constraint"),
    [
        ({"headers": {"x-retry-count": 1}}, "event_outbox_headers_valid"),
        ({"headers": {"x-trace": None}}, "event_outbox_headers_valid"),
        ({"headers": {"x": "two\nlines"}}, "event_outbox_headers_valid"),
        ({"headers": {"Nats-Msg-Id": "other"}}, "event_outbox_headers_valid"),
        ({"subject": "a." + "b" * (MAX_SUBJECT_BYTES - 1)}, "event_outbox_subject_length"),
        ({"ordering_key": "two\r\nlines"}, "event_outbox_ordering_key_valid"),
    ],
)
async def test_the_sql_function_refuses_rows_the_relay_cannot_send(
    db: psycopg.Connection[Any], outbox: Settings, row: dict[str, Any], constraint: str
) -> None:
    subject = row.pop("subject", "a.b")
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        enqueue_sql(db, outbox, subject, "m-1", **row)
    assert refused.value.diag.constraint_name == constraint


async def test_rows_past_the_constraints_are_their_own_failure_never_a_crash(
    outbox: Settings, nc: NATS
) -> None:
    # Rows written before the constraints existed (or with them dropped): the relay is
    # the last line of defence and fails each of them alone, keeping its connection.
    settings = replace(outbox, max_attempts=1)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for constraint in (
            "event_outbox_headers_valid",
            "event_outbox_subject_length",
            "event_outbox_ordering_key_valid",
        ):
            conn.execute(
                sql.SQL("ALTER TABLE {}.event_outbox DROP CONSTRAINT IF EXISTS {}").format(
                    sql.Identifier(settings.schema), sql.Identifier(constraint)
                )
            )
        prefix = settings.subject_prefix
        subject = f"{prefix}.a"
        enqueue_sql(conn, settings, subject, "int-header", headers={"x-retry-count": 1})
        enqueue_sql(conn, settings, subject, "null-header", headers={"x": None}, ordering_key="k")
        enqueue_sql(conn, settings, f"{prefix}.{'s' * 5000}", "long-subject")
        enqueue_sql(conn, settings, subject, "bad-key", ordering_key="two\nlines")
    good = emit_events(settings, 16, execution_id=7)
    async with running_relay(settings) as relay:
        await wait_until(lambda: drained(settings))
        more = emit_events(settings, 3, execution_id=8)  # the connection survived
        await wait_until(lambda: drained(settings))
    assert_exactly_once(await stream_messages(nc, settings), [*good, *more])
    reasons = dict(
        await fetch_all(
            settings,
            sql.SQL("SELECT event_id, reason FROM {}.event_outbox_dead_letter").format(
                sql.Identifier(settings.schema)
            ),
        )
    )
    assert sorted(reasons) == ["bad-key", "int-header", "long-subject", "null-header"]
    assert "must be a string, not int" in reasons["int-header"]
    assert "must be a string, not NoneType" in reasons["null-header"]
    assert f"over the maximum of {MAX_SUBJECT_BYTES}" in reasons["long-subject"]
    assert "one-line string" in reasons["bad-key"]
    assert relay.stats.dead_lettered == 4


async def test_the_longest_subject_allowed_is_published(outbox: Settings, nc: NATS) -> None:
    subject = f"{outbox.subject_prefix}."
    subject += "s" * (MAX_SUBJECT_BYTES - len(subject))
    with psycopg.connect(outbox.database_url) as conn:
        producer_for(outbox).enqueue(conn, subject=subject, payload=b"x", msg_id="longest")
        conn.commit()
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
    (message,) = await stream_messages(nc, outbox)
    assert message.subject == subject


async def test_the_producer_refuses_what_the_server_could_never_take(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    producer = producer_for(outbox)  # the default maximum: the server's 1 MiB max_payload
    with pytest.raises(InvalidSubjectError, match="over the maximum of 4000"):
        producer.enqueue(db, subject="a." + "b" * 4000, payload=b"x", msg_id="1")
    # Under 1 MiB by themselves, over it with the headers the relay adds.
    with pytest.raises(PayloadTooLargeError, match="once the relay adds"):
        producer.enqueue(db, subject="a.b", payload=b"x" * (2**20 - 100), msg_id="1")
    context = {"x": "y" * (2**20 - 400)}
    with pytest.raises(PayloadTooLargeError, match="once the relay adds"):
        producer.emit_event(db, event_type="big", execution_id=1, context=context)
    db.rollback()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        ({"headers": {"x": "nul\x00"}}, InvalidHeadersError, "without NUL"),
        ({"headers": {"x": 1}}, InvalidHeadersError, "must be a string"),
        ({"headers": {"Outbox-Sequence": "1"}}, InvalidHeadersError, "set by the relay"),
        ({"msg_id": "tab\tid"}, InvalidHeadersError, "control characters"),
        ({"msg_id": " padded "}, InvalidHeadersError, "blanks around it"),
        ({"ordering_key": "two\nlines"}, InvalidHeadersError, "one-line"),
        ({"subject": "a.\ud800"}, InvalidSubjectError, "not valid Unicode"),
    ],
)
async def test_bad_enqueue_arguments_raise_typed_errors(
    db: psycopg.Connection[Any],
    outbox: Settings,
    call: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    arguments = {"subject": "a.b", "payload": b"x", "msg_id": "1", **call}
    with pytest.raises(error, match=message):
        producer_for(outbox).enqueue(db, **arguments)


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"x": float("nan")}, "NaN or Infinity"),
        ({"x": [float("inf")]}, "NaN or Infinity"),
        ({"x": 2**70}, "as jsonb"),
        ({"x": "nul\x00"}, "contains NUL"),
        ({1: "non-str key"}, "as jsonb"),
        (1.5, "is of type jsonb"),
    ],
)
async def test_values_jsonb_would_change_or_refuse_raise_typed_errors(
    db: psycopg.Connection[Any], outbox: Settings, context: Any, message: str
) -> None:
    with pytest.raises(InvalidValueError, match=message):
        producer_for(outbox).emit_event(db, event_type="a", execution_id=1, context=context)


async def test_an_out_of_range_column_value_raises_a_typed_error(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    with pytest.raises(InvalidValueError, match="out of range"):
        producer_for(outbox).emit_event(db, event_type="a", execution_id=1, catalog_id=2**70)


async def test_replay_refuses_events_whose_subject_nats_could_not_take(outbox: Settings) -> None:
    # NoETL writes its event table itself; the subject is made at replay.
    async with await connect_postgres(outbox) as conn:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {}.event (execution_id, event_id, event_type) VALUES (1, 1, %s)"
            ).format(sql.Identifier(outbox.schema)),
            ("t" * MAX_SUBJECT_BYTES,),
        )
        await conn.commit()
        with pytest.raises(ConfigError, match="event_outbox_subject_length"):
            await replay(
                conn, outbox.names, outbox.subject_prefix, ReplaySelection(everything=True)
            )


async def _migrated_before(settings: Settings, version: int) -> None:
    """The schema as it was before migration ``version``."""
    names = settings.names
    async with await connect_postgres(settings) as conn:
        await conn.execute(query("create_migrations_table", names))
        for migration in migrations():
            if migration.version < version:
                await conn.execute(render(migration.text, names))
                await conn.execute(
                    query("record_migration", names),
                    {"version": migration.version, "name": migration.name},
                )
        await conn.commit()


async def test_migration_0007_moves_rows_it_would_refuse_to_the_dead_letters(
    unmigrated: Settings,
) -> None:
    names = unmigrated.names
    await _migrated_before(unmigrated, 7)  # before the constraints
    with psycopg.connect(unmigrated.database_url, autocommit=True) as sync:
        enqueue_sql(sync, unmigrated, "a.b", "bad-header", headers={"x-retry-count": 1})
        enqueue_sql(sync, unmigrated, "a." + "b" * 5000, "long-subject")
        enqueue_sql(sync, unmigrated, "a.b", "fine", headers={"x": "y"})
    async with await connect_postgres(unmigrated) as conn:
        await migrate(conn, names)
    dead = await fetch_all(
        unmigrated,
        sql.SQL("SELECT event_id, reason FROM {}.event_outbox_dead_letter ORDER BY id").format(
            sql.Identifier(unmigrated.schema)
        ),
    )
    assert [event_id for event_id, _ in dead] == ["bad-header", "long-subject"]
    assert all("migration 0007" in reason for _, reason in dead)
    pending = await fetch_all(
        unmigrated,
        sql.SQL("SELECT event_id FROM {}.event_outbox").format(sql.Identifier(unmigrated.schema)),
    )
    assert pending == [("fine",)]


async def test_migration_0008_moves_rows_the_relay_would_alter_to_the_dead_letters(
    unmigrated: Settings,
) -> None:
    await _migrated_before(unmigrated, 8)
    with psycopg.connect(unmigrated.database_url, autocommit=True) as sync:
        enqueue_sql(sync, unmigrated, "a.b", "padded-id ")
        enqueue_sql(sync, unmigrated, "a.b", "api-level", headers={"Nats-Required-Api-Level": "9"})
        enqueue_sql(sync, unmigrated, "a.b", "padded-value", headers={"x": " y"})
        enqueue_sql(sync, unmigrated, "a.\u00a0", "blank-subject")
        enqueue_sql(sync, unmigrated, "a.b", "fine", headers={"x": "y z"})
    async with await connect_postgres(unmigrated) as conn:
        await migrate(conn, unmigrated.names)
    dead = await fetch_all(
        unmigrated,
        sql.SQL("SELECT event_id, reason FROM {}.event_outbox_dead_letter ORDER BY id").format(
            sql.Identifier(unmigrated.schema)
        ),
    )
    assert [event_id for event_id, _ in dead] == [
        "padded-id ",
        "api-level",
        "padded-value",
        "blank-subject",
    ]
    assert all("migration 0008" in reason for _, reason in dead)
    pending = await fetch_all(
        unmigrated,
        sql.SQL("SELECT event_id FROM {}.event_outbox").format(sql.Identifier(unmigrated.schema)),
    )
    assert pending == [("fine",)]
