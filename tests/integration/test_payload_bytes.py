"""An event's payload bytes depend on the row alone, not on the writing session."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.replay import ReplaySelection, replay
from tests.helpers import fetch_all, producer_for
from tests.noetl import NOETL_CATALOG_ID

# Settings that change how PostgreSQL renders values, as producers' sessions may have.
SESSIONS: list[dict[str, str]] = [
    {},
    {
        "TimeZone": "America/Los_Angeles",
        "DateStyle": "SQL, DMY",
        "IntervalStyle": "sql_standard",
        "extra_float_digits": "-3",
    },
    {
        "TimeZone": "Asia/Kolkata",
        "DateStyle": "German",
        "IntervalStyle": "iso_8601",
        "extra_float_digits": "3",
    },
]


async def test_the_same_row_renders_to_the_same_bytes_from_any_session_and_replay(
    noetl_outbox: Settings,
) -> None:
    settings = noetl_outbox
    moment = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    producer = producer_for(settings)
    for execution_id, options in enumerate(SESSIONS, start=1):
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for name, value in options.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            producer.emit_event(
                conn,
                event_type="command.issued",
                execution_id=execution_id,
                catalog_id=NOETL_CATALOG_ID,
                event_time=moment,  # timestamptz, as NoETL's envelope columns are
                ingest_time=moment,
                duration=0.1 + 0.2,
            )
    outbox_rows = sql.SQL("SELECT event_id, payload FROM {} ORDER BY id").format(
        settings.names.identifiers()["outbox_table"]
    )
    written = dict(await fetch_all(settings, outbox_rows))
    assert len(written) == len(SESSIONS)
    for payload in written.values():
        assert b'"event_time": "2026-03-01T12:00:00.123456+00:00"' in payload

    async with await connect_postgres(settings) as conn:
        await conn.execute(
            sql.SQL("DELETE FROM {}").format(settings.names.identifiers()["outbox_table"])
        )
        await replay(
            conn, settings.names, settings.subject_prefix, ReplaySelection(everything=True)
        )
        await conn.commit()
    assert dict(await fetch_all(settings, outbox_rows)) == written
