import time
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import class_row, dict_row, namedtuple_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import (
    InvalidHeadersError,
    InvalidSubjectError,
    NotMigratedError,
    PayloadTooLargeError,
)
from outbox_relay.ids import SnowflakeGenerator, split_id
from tests.helpers import fetch_all, producer_for


def outbox_rows(settings: Settings) -> sql.Composed:
    return sql.SQL(
        "SELECT event_id, subject, payload, headers, attempts FROM {}.event_outbox ORDER BY id"
    ).format(sql.Identifier(settings.schema))


async def test_emit_event_writes_the_event_and_its_outbox_row(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    producer = producer_for(outbox)
    with db.transaction():
        event_id = producer.emit_event(
            db,
            event_type="command.issued",
            execution_id=42,
            node_name="fetch",
            context={"url": "https://example.test", "n": [1, 2]},
            duration=1.5,
        )
    unix_ms, _, _ = split_id(event_id)  # time in the top bits, as in NoETL's layout
    assert abs(unix_ms / 1000 - time.time()) < 60
    (row,) = await fetch_all(outbox, outbox_rows(outbox))
    msg_id, subject, payload, headers, attempts = row
    assert (msg_id, subject, headers, attempts) == (
        str(event_id),
        f"{outbox.subject_prefix}.command.issued",
        None,
        0,
    )
    # The payload is byte for byte what to_jsonb(noetl.event row) gives.
    (expected,) = await fetch_all(
        outbox,
        sql.SQL("SELECT convert_to(to_jsonb(e)::text, 'UTF8') FROM {}.event e").format(
            sql.Identifier(outbox.schema)
        ),
    )
    assert payload == expected[0]
    event = orjson.loads(payload)
    assert event["event_id"] == event_id
    assert event["execution_id"] == 42
    assert event["context"] == {"url": "https://example.test", "n": [1, 2]}
    assert event["created_at"]  # the column default, rendered by PostgreSQL


async def test_rollback_leaves_nothing_behind(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    producer = producer_for(outbox)

    def write_then_fail() -> None:
        with db.transaction():
            producer.emit_event(db, event_type="step.exit", execution_id=1)
            producer.enqueue(db, subject="other.subject", payload=b"x", msg_id="m-1")
            raise RuntimeError("the application fails after writing")

    with pytest.raises(RuntimeError):
        write_then_fail()
    assert await fetch_all(outbox, outbox_rows(outbox)) == []


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_async_twins_write_the_same_rows(outbox: Settings) -> None:
    producer = producer_for(outbox)
    async with await connect_postgres(outbox) as conn:
        event_id = await producer.emit_event_async(conn, event_type="a.b", execution_id=7)
        queue_id = await producer.enqueue_async(
            conn,
            subject="custom.subject",
            payload=b"\x00\xffraw",
            msg_id="custom-1",
            headers={"traceparent": TRACEPARENT},
        )
        await conn.commit()
    rows = await fetch_all(outbox, outbox_rows(outbox))
    assert [r[:4] for r in rows] == [
        (str(event_id), f"{outbox.subject_prefix}.a.b", rows[0][2], None),
        ("custom-1", "custom.subject", b"\x00\xffraw", {"traceparent": TRACEPARENT}),
    ]
    assert queue_id > 0


async def test_invalid_subject_is_refused_before_the_database(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    producer = producer_for(outbox)
    with pytest.raises(InvalidSubjectError, match="wildcards"):
        producer.enqueue(db, subject="orders.*", payload=b"x", msg_id="1")
    with pytest.raises(InvalidSubjectError, match="white space"):
        producer.emit_event(db, event_type="bad type", execution_id=1)
    # Nothing was sent, so the transaction is still usable.
    assert db.execute("SELECT 1").fetchone() == (1,)


async def test_oversize_payloads_are_refused_before_commit(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    producer = producer_for(outbox, max_payload=1000)
    with pytest.raises(PayloadTooLargeError, match="1001 bytes exceeds the maximum of 1000"):
        producer.enqueue(db, subject="a.b", payload=b"x" * 1001, msg_id="1")
    # An event's payload is rendered in the database; the database refuses it there.
    with pytest.raises(PayloadTooLargeError, match="exceeds the maximum of 1000 bytes"):
        producer.emit_event(db, event_type="big", execution_id=1, context={"blob": "y" * 2000})
    db.rollback()
    assert await fetch_all(outbox, outbox_rows(outbox)) == []


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Nats-Msg-Id": "x"}, "set by the relay"),
        ({"bad name": "x"}, "invalid header name"),
        ({"ok": "two\r\nlines"}, "one-line"),
        ({"traceparent": "00-abc-def-01"}, "not W3C Trace Context"),
        ({"traceparent": f"00-{'0' * 32}-b7ad6b7169203331-01"}, "not W3C Trace Context"),
    ],
)
async def test_bad_headers_are_refused(
    db: psycopg.Connection[Any], outbox: Settings, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidHeadersError, match=message):
        producer_for(outbox).enqueue(db, subject="a.b", payload=b"x", msg_id="1", headers=headers)


async def test_unknown_event_columns_fail_loudly(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    with pytest.raises(psycopg.errors.UndefinedColumn, match="no_such_column"):
        producer_for(outbox).emit_event(db, event_type="a", execution_id=1, no_such_column=1)


async def test_producers_lease_one_id_instance_per_process_and_schema(
    db: psycopg.Connection[Any], outbox: Settings
) -> None:
    first, second = producer_for(outbox), producer_for(outbox)
    ids = [p.emit_event(db, event_type="a", execution_id=1) for p in (first, second) * 50]
    assert len(set(ids)) == 100
    assert first._ids() is second._ids()  # one leased generator, shared
    configured = producer_for(outbox, ids=SnowflakeGenerator(3))
    assert split_id(configured.emit_event(db, event_type="a", execution_id=1))[1] == 3


class _Row:
    """A class row factory's target, built from whatever columns a query returns."""

    def __init__(self, **columns: Any) -> None:
        self.columns = columns


ROW_FACTORIES: list[Any] = [tuple_row, dict_row, namedtuple_row, class_row(_Row)]


@pytest.mark.parametrize("row_factory", ROW_FACTORIES)
async def test_the_producer_works_with_any_row_factory(outbox: Settings, row_factory: Any) -> None:
    producer = producer_for(outbox)
    with psycopg.connect(outbox.database_url, row_factory=row_factory) as conn:
        sync_id = producer.emit_event(conn, event_type="a.b", execution_id=1)
        producer.enqueue(conn, subject="c.d", payload=b"x", msg_id="sync")
    async with await psycopg.AsyncConnection.connect(
        outbox.database_url, row_factory=row_factory
    ) as aconn:
        async_id = await producer.emit_event_async(aconn, event_type="a.b", execution_id=1)
        await producer.enqueue_async(aconn, subject="c.d", payload=b"x", msg_id="async")
    rows = await fetch_all(outbox, outbox_rows(outbox))
    assert [r[0] for r in rows] == [str(sync_id), "sync", str(async_id), "async"]


async def test_the_producer_works_inside_noetls_pool_configuration(outbox: Settings) -> None:
    # NoETL's server pool (noetl/core/db/pool.py): dict rows on every connection.
    pool = AsyncConnectionPool(
        outbox.database_url,
        min_size=1,
        max_size=5,
        timeout=10,
        max_lifetime=1800.0,
        max_idle=300.0,
        kwargs={"row_factory": dict_row},
        name="noetl_server",
        open=False,
    )
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            event_id = await producer_for(outbox).emit_event_async(
                conn, event_type="a.b", execution_id=9
            )
    finally:
        await pool.close()
    rows = await fetch_all(outbox, outbox_rows(outbox))
    assert [r[0] for r in rows] == [str(event_id)]


async def test_a_producer_used_before_migrate_is_told_to_migrate(unmigrated: Settings) -> None:
    producer = producer_for(unmigrated)
    with psycopg.connect(unmigrated.database_url) as conn:
        with pytest.raises(NotMigratedError, match="run `outbox-relay migrate`"):
            producer.emit_event(conn, event_type="early", execution_id=1)
        conn.rollback()
        with pytest.raises(NotMigratedError, match=f'schema "{unmigrated.schema}" does not'):
            producer.enqueue(
                conn, subject=f"{unmigrated.subject_prefix}.x", payload=b"{}", msg_id="m"
            )
    async with await connect_postgres(unmigrated) as aconn:
        with pytest.raises(NotMigratedError):
            await producer.emit_event_async(aconn, event_type="early", execution_id=1)
