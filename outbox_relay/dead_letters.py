"""Dead letters for the operator: list, re-queue, purge, always through one filter."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from outbox_relay.errors import ConfigError
from outbox_relay.queries import Names, query


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a command acts on; fields left None do not filter."""

    ids: tuple[int, ...] | None = None
    from_id: int | None = None
    to_id: int | None = None
    reason: str | None = None  # case-insensitive substring of the reason
    older_than: float | None = None  # seconds since dead-lettered
    everything: bool = False  # required, for retry and purge, when nothing else is given

    @property
    def empty(self) -> bool:
        return (
            self.ids is None
            and self.from_id is None
            and self.to_id is None
            and self.reason is None
            and self.older_than is None
        )

    def params(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids) if self.ids is not None else None,
            "from_id": self.from_id,
            "to_id": self.to_id,
            "reason": self.reason,
            "older_than": self.older_than,
        }


async def list_dead_letters(
    conn: psycopg.AsyncConnection[Any], names: Names, selection: DeadLetterFilter, limit: int
) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            _query("dead_letters_list", names), {**selection.params(), "limit": limit}
        )
        return await cur.fetchall()


async def show_dead_letter(
    conn: psycopg.AsyncConnection[Any], names: Names, dead_letter_id: int
) -> dict[str, Any] | None:
    """One dead letter whole, its payload as JSON, text or base64 (whichever it is)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("dead_letters_show", names), {"id": dead_letter_id})
        row = await cur.fetchone()
    if row is None:
        return None
    payload = bytes(row.pop("payload"))
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        row["payload_base64"] = base64.b64encode(payload).decode()
        return row
    try:
        row["payload"] = orjson.loads(payload)
    except orjson.JSONDecodeError:
        row["payload_text"] = text
    return row


async def retry_dead_letters(
    conn: psycopg.AsyncConnection[Any], names: Names, selection: DeadLetterFilter
) -> int:
    """Move the selected rows back into the outbox; return how many."""
    return await _change("dead_letters_retry", conn, names, selection)


async def purge_dead_letters(
    conn: psycopg.AsyncConnection[Any], names: Names, selection: DeadLetterFilter
) -> int:
    """Delete the selected rows for good; return how many."""
    return await _change("dead_letters_purge", conn, names, selection)


async def _change(
    name: str, conn: psycopg.AsyncConnection[Any], names: Names, selection: DeadLetterFilter
) -> int:
    if selection.empty and not selection.everything:
        raise ConfigError("select dead letters with --id, --reason or --older-than, or pass --all")
    cur = await conn.execute(_query(name, names), selection.params())
    return cur.rowcount


def _query(name: str, names: Names) -> sql.Composed:
    return query(name, names, filter=query("dead_letter_filter", names))
