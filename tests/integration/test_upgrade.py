"""Rolling upgrades: a relay never claims rows under rules other than the schema's.

During a rolling upgrade `migrate` runs while relays of the previous release are
still claiming; later, relays of this release will meet a schema migrated past them.
"""

from __future__ import annotations

import anyio
import psycopg
import pytest
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import NotMigratedError
from outbox_relay.queries import render
from outbox_relay.relay import Relay
from outbox_relay.schema import latest_version
from tests.helpers import emit_events, lag, wait_until

# The claim of the previous release (59b4c10, schema version 4), word for word.
PREVIOUS_RELEASE_CLAIM = """
SELECT o.id, o.event_id, o.subject, o.payload, o.headers, o.ordering_key
FROM {outbox_table} AS o
WHERE o.next_attempt_at <= now()
  AND (o.ordering_key IS NULL
       OR NOT %(ordered)s
       OR (o.key_partition = ANY(%(partitions)s::smallint[])
           AND NOT EXISTS (
               SELECT FROM {outbox_table} AS b
               WHERE b.ordering_key = o.ordering_key AND b.id < o.id
                 AND b.attempts > 0 AND b.next_attempt_at > now())
           AND NOT (%(hold)s AND EXISTS (
               SELECT FROM {dead_letter_table} AS d
               WHERE d.ordering_key = o.ordering_key AND d.id < o.id))))
ORDER BY o.id
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED
"""


async def test_the_previous_releases_claim_fails_against_the_new_schema(outbox: Settings) -> None:
    emit_events(outbox, 3)
    claim = render(PREVIOUS_RELEASE_CLAIM, outbox.names)
    async with await connect_postgres(outbox) as conn:
        for ordered in (True, False):
            with pytest.raises(psycopg.errors.UndefinedColumn, match="key_partition"):
                await conn.execute(
                    claim,
                    {"ordered": ordered, "partitions": list(range(64)), "hold": True, "limit": 10},
                )
            await conn.rollback()
    assert (await lag(outbox)).pending == 3


async def test_a_relay_stops_when_the_schema_moves_past_it(outbox: Settings) -> None:
    stopped: list[NotMigratedError] = []
    relay = Relay(outbox, relay_id="old")

    async def run() -> None:
        try:
            await relay.run()
        except* NotMigratedError as group:  # raised inside the relay's task group
            stopped.extend(e for e in group.exceptions if isinstance(e, NotMigratedError))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await relay.wait_started()
        async with await connect_postgres(outbox) as conn:
            await conn.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, 'from_the_future')").format(
                    sql.Identifier(outbox.schema, "event_outbox_migration")
                ),
                (latest_version() + 1,),
            )
            await conn.commit()
        emit_events(outbox, 2)
        with anyio.fail_after(10):
            await wait_until(lambda: _stopped(stopped))
    assert f"is at version {latest_version() + 1}, this relay speaks version" in str(stopped[0])
    assert "\n" not in str(stopped[0])
    assert (await lag(outbox)).pending == 2  # nothing claimed under the newer schema


async def _stopped(stopped: list[NotMigratedError]) -> bool:
    return bool(stopped)
