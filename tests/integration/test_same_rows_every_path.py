"""The SQL function accepts exactly the rows the producer API accepts, and every row
accepted is published byte for byte (issue 20, item 7)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from psycopg import sql
from psycopg.types.json import Jsonb

from outbox_relay.config import Settings
from outbox_relay.errors import OutboxError
from tests.helpers import drained, producer_for, running_relay, stream_messages, wait_until

ENQUEUE = (
    "SELECT {}.event_outbox_enqueue(subject => %s, payload => %s, event_id => %s, "
    "headers => %s, ordering_key => %s)"
)
# Blanks of every kind, where they matter most: at the ends, and alone.
BLANKS = " \t\u000b\u000c\u001c\u001f\u0085\u00a0\u1680\u2000\u200a\u2028\u202f\u205f\u3000"
TEXT = st.one_of(
    st.text(st.sampled_from(f"ab-{BLANKS}"), min_size=1, max_size=4),
    st.text(st.characters(categories=["Zs", "Cc", "Ll", "Sm"]), min_size=1, max_size=4),
)


def _by_api(conn: psycopg.Connection[Any], settings: Settings, row: dict[str, Any]) -> bool:
    try:
        with conn.transaction(force_rollback=True):
            producer_for(settings).enqueue(conn, payload=b"{}", **row)
    except OutboxError:
        return False
    return True


def _by_sql(conn: psycopg.Connection[Any], settings: Settings, row: dict[str, Any]) -> bool:
    headers = row.get("headers")
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(
                sql.SQL(ENQUEUE).format(sql.Identifier(settings.schema)),
                (
                    row["subject"],
                    b"{}",
                    row["msg_id"],
                    None if headers is None else Jsonb(headers),
                    row.get("ordering_key"),
                ),
            )
    except (psycopg.errors.CheckViolation, psycopg.errors.DataError):
        return False
    return True


def _rows(settings: Settings, token: str) -> list[dict[str, Any]]:
    """One row per place a value can go: the subject, the msg id, a header value, the key."""
    subject = f"{settings.subject_prefix}.ok"
    return [
        {"subject": f"{settings.subject_prefix}.{token}", "msg_id": "m"},
        {"subject": subject, "msg_id": token},
        {"subject": subject, "msg_id": "m", "headers": {"X-Note": token}},
        {"subject": subject, "msg_id": "m", "ordering_key": token},
    ]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(token=TEXT)
async def test_the_sql_function_accepts_exactly_what_the_api_accepts(
    db: psycopg.Connection[Any], outbox: Settings, token: str
) -> None:
    if "\x00" in token:
        token = token.replace("\x00", "")  # PostgreSQL text cannot hold NUL at all
        if not token:
            return
    for row in _rows(outbox, token):
        assert _by_api(db, outbox, row) == _by_sql(db, outbox, row), row


@pytest.mark.parametrize(
    "row",
    [
        {"msg_id": "inv-42 "},
        {"msg_id": "\u00a0inv-42"},
        {"ordering_key": " 42"},
        {"headers": {"X-Note": "  padded  "}},
        {"subject_token": "a\u00a0b"},
        {"headers": {"Nats-Required-Api-Level": "99"}},
        {"headers": {"Nats-Expected-Last-Msg-Id": "x"}},
        {"headers": {"nats-rollup": "sub"}},
    ],
    ids=repr,
)
async def test_rows_the_relay_would_alter_or_the_server_would_choke_on_are_refused_by_both(
    db: psycopg.Connection[Any], outbox: Settings, row: dict[str, Any]
) -> None:
    token = row.pop("subject_token", "ok")
    full = {"subject": f"{outbox.subject_prefix}.{token}", "msg_id": "m"} | row
    assert (_by_api(db, outbox, full), _by_sql(db, outbox, full)) == (False, False)


async def test_values_with_inner_blanks_are_published_byte_for_byte(
    outbox: Settings, nc: NATS
) -> None:
    msg_id, key, note = "inv\u00a042", "a b", "x  y\u3000z"
    with psycopg.connect(outbox.database_url) as conn:
        conn.execute(
            sql.SQL(ENQUEUE).format(sql.Identifier(outbox.schema)),
            (f"{outbox.subject_prefix}.ok", b"{}", msg_id, Jsonb({"X-Note": note}), key),
        )
        conn.commit()
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
    [stored] = await stream_messages(nc, outbox)
    assert stored.headers is not None
    assert (
        stored.headers["Nats-Msg-Id"],
        stored.headers["Outbox-Ordering-Key"],
        stored.headers["X-Note"],
    ) == (msg_id, key, note)
