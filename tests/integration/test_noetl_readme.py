"""The README's NoETL insert pattern, run as written against a NoETL-shaped schema."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
from psycopg import sql

from outbox_relay.config import Settings
from tests.helpers import fetch_all

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
_SNIPPET = re.compile(r"<!-- the NoETL insert pattern.*?-->\n```sql\n(.*?)```", re.DOTALL)
# NoETL's objects and ours as the README names them, in schema "noetl".
_NOETL_OBJECT = re.compile(r"\bnoetl\.(?=event\b|event_outbox_\w+|snowflake_id\b)")


async def test_the_readme_insert_pattern_writes_the_event_and_its_message(
    noetl_outbox: Settings,
) -> None:
    found = _SNIPPET.search(README)
    assert found, "README lost its NoETL insert pattern"
    schema = sql.Identifier(noetl_outbox.schema).as_string()
    statement = _NOETL_OBJECT.sub(f"{schema}.", found[1])
    (row,) = await fetch_all(noetl_outbox, statement)
    assert row[0] > 0
    s = sql.Identifier(noetl_outbox.schema)
    events = await fetch_all(noetl_outbox, sql.SQL("SELECT event_id FROM {}.event").format(s))
    messages = await fetch_all(
        noetl_outbox,
        sql.SQL("SELECT event_id, subject, payload, ordering_key FROM {}.event_outbox").format(s),
    )
    ((event_id,),) = events
    ((msg_id, subject, payload, ordering_key),) = messages
    assert (msg_id, subject, ordering_key) == (
        str(event_id),
        "noetl.events.command.issued",
        "42",
    )
    assert orjson.loads(payload)["event_id"] == event_id
