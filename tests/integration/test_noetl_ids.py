"""Event ids beside NoETL's own noetl.snowflake_id(): never equal, even at full speed."""

from __future__ import annotations

import threading

import psycopg
from psycopg import sql

from outbox_relay.config import Settings
from tests.helpers import fetch_all, producer_for
from tests.noetl import NOETL_CATALOG_ID


async def test_leased_ids_never_equal_noetls_minted_in_the_same_millisecond(
    noetl_outbox: Settings,
) -> None:
    settings = noetl_outbox
    schema = sql.Identifier(settings.schema)
    # The next lease is number 64: the first whose ids read as NoETL's shard 1.
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("SELECT setval(%s::regclass, 63)", (settings.names.instance_sequence,))
    done = threading.Event()

    def noetl_at_full_speed() -> None:
        # NoETL's inserts, ids from its function, 500 a statement, other executions.
        insert = sql.SQL(
            "INSERT INTO {s}.event (event_id, execution_id, catalog_id, event_type)"
            " SELECT {s}.snowflake_id(), 1000 + g, %s, 'noetl.own'"
            " FROM generate_series(1, 500) AS g"
        ).format(s=schema)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            while not done.is_set():
                conn.execute(insert, (NOETL_CATALOG_ID,))

    noetl = threading.Thread(target=noetl_at_full_speed)
    noetl.start()
    try:
        producer = producer_for(settings)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for _ in range(1000):
                producer.emit_event(
                    conn, event_type="ours", execution_id=1, catalog_id=NOETL_CATALOG_ID
                )
    finally:
        done.set()
        noetl.join()
    (overlap,) = await fetch_all(
        settings,
        sql.SQL(
            "SELECT count(DISTINCT o.event_id >> 23), count(n.event_id)"
            " FROM {s}.event AS o LEFT JOIN {s}.event AS n"
            "   ON n.event_id = o.event_id AND n.execution_id <> o.execution_id"
            " WHERE o.execution_id = 1"
            "   AND o.event_id >> 23 IN (SELECT event_id >> 23 FROM {s}.event"
            "                            WHERE execution_id > 1)"
        ).format(s=schema),
    )
    shared_milliseconds, equal_ids = overlap
    assert shared_milliseconds > 50  # both minted in the same milliseconds, often
    assert equal_ids == 0
