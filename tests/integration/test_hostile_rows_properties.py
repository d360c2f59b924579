"""Property: whatever reaches the outbox by a documented path (the producer API, the SQL
function) is either refused at write time with a typed error, or drained by a relay
that never exits, into the stream or the dead letters."""

from dataclasses import dataclass, replace
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from outbox_relay.config import Settings
from outbox_relay.errors import OutboxError
from tests.helpers import lag, producer_for, running_relay, wait_until

TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(categories=["Cc", "Zs", "Ll", "Po", "Sm", "So"]), max_size=8),
)
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(),  # NaN and Infinity included
        TEXT,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
HEADER_VALUES = st.one_of(TEXT, st.integers(), st.none(), st.booleans(), st.floats())
PAYLOADS = st.one_of(
    st.binary(max_size=64),
    # Around the server's 1 MiB max_payload, where the relay's headers decide; a size,
    # so a failing example prints short.
    st.sampled_from([2**20 - 600, 2**20 - 100, 2**20 + 10]),
)


@dataclass(frozen=True)
class Row:
    path: str  # "enqueue", "sql" or "emit"
    subject_token: str
    bound: bool  # under the stream's prefix, or anywhere
    payload: bytes | int  # an int n: n bytes
    msg_id: str
    headers: dict[str, Any] | None
    ordering_key: str | None
    context: Any


ROWS = st.builds(
    Row,
    path=st.sampled_from(["enqueue", "sql", "emit"]),
    subject_token=st.one_of(TEXT, st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,2}", fullmatch=True)),
    bound=st.booleans(),
    payload=PAYLOADS,
    msg_id=TEXT,
    headers=st.one_of(st.none(), st.dictionaries(TEXT, HEADER_VALUES, max_size=3)),
    ordering_key=st.one_of(st.none(), TEXT),
    context=JSON_VALUES,
)
ENQUEUE = (
    "SELECT {}.event_outbox_enqueue(subject => %s, payload => %s, event_id => %s, "
    "headers => %s, ordering_key => %s)"
)


def write(conn: psycopg.Connection[Any], settings: Settings, row: Row, n: int) -> None:
    """One row by its path; raises what that path raises for a row it refuses."""
    subject = f"{settings.subject_prefix}.{row.subject_token}" if row.bound else row.subject_token
    producer = producer_for(settings)
    payload = b"x" * row.payload if isinstance(row.payload, int) else row.payload
    msg_id = f"{n}{row.msg_id}"  # unique per row, so the stream never collapses two
    if row.path == "enqueue":
        producer.enqueue(
            conn,
            subject=subject,
            payload=payload,
            msg_id=msg_id,
            headers=row.headers,
            ordering_key=row.ordering_key,
        )
    elif row.path == "sql":
        conn.execute(
            sql.SQL(ENQUEUE).format(sql.Identifier(settings.schema)),
            (
                subject,
                payload,
                msg_id,
                None if row.headers is None else Jsonb(row.headers),
                row.ordering_key,
            ),
        )
    else:
        producer.emit_event(
            conn,
            event_type=row.subject_token,
            execution_id=n,
            headers=row.headers,
            context=row.context,
        )


@pytest.fixture
def hostile(outbox: Settings) -> Settings:
    # Failures go straight to the dead letters; a dead-lettered key does not hold the
    # rest of its key (hold is a documented wait for the operator, not a stuck key).
    return replace(outbox, max_attempts=1, dead_letter_policy="skip", publish_timeout=3.0)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(ROWS, min_size=1, max_size=10))
async def test_every_row_is_refused_published_or_dead_lettered(
    hostile: Settings, rows: list[Row]
) -> None:
    accepted = 0
    with psycopg.connect(hostile.database_url) as conn:
        for n, row in enumerate(rows):
            # Refused at write time: the API with a typed error, the SQL function with
            # a constraint or data error. Anything else fails the test.
            refusal = psycopg.Error if row.path == "sql" else OutboxError
            try:
                with conn.transaction():
                    write(conn, hostile, row, n)
            except refusal:
                continue
            accepted += 1
    before = await lag(hostile)
    async with running_relay(hostile) as relay:

        async def drained() -> bool:
            return (await lag(hostile)).pending == 0

        await wait_until(drained, within=60)
    after = await lag(hostile)
    assert before.pending == accepted
    assert relay.stats.published + relay.stats.dead_lettered == accepted
    assert after.dead_letters - before.dead_letters == relay.stats.dead_lettered
