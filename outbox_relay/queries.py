"""Named SQL from the ``sql/`` files, rendered with quoted identifiers.

Every configurable name reaches SQL through :class:`psycopg.sql.Identifier` or
:class:`psycopg.sql.Literal`; no query is built by string concatenation.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import LiteralString

from psycopg import sql

from outbox_relay.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent
# An installed wheel carries sql/ inside the package; a source checkout keeps it at
# the top of the repository.
SQL_DIR = next(
    (d for d in (_PACKAGE_DIR / "sql", _PACKAGE_DIR.parent / "sql") if d.is_dir()),
    _PACKAGE_DIR / "sql",
)
_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# Whole-line comments: for readers of sql/, not sent. Without them the claim fits
# psycopg's cache of converted queries (4 KiB), so it is not parsed at every batch.
_COMMENT_LINE = re.compile(r"^\s*--.*\n", re.MULTILINE)
_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1
# Group roles sql/roles.sql grants to, one per kind of user.
ROLE_PURPOSES = ("producer", "relay", "operator")
IDLE_LOCK_CLASS = 0x4F52  # first key of our advisory locks ("OR"), an int4
# The producers' per-key lock of migration 0004, which 0005 removed ("OK").
KEY_LOCK_CLASS = 0x4F4B
MEMBER_LOCK_CLASS = 0x4F4D  # held shared by every running relay ("OM")
PARTITION_LOCK_CLASS = 0x4F500000  # + partition number: owned by one relay
# + partition number: held shared by every claim that may take rows of it ("OC").
CLAIMED_LOCK_CLASS = 0x4F430000
KEY_PARTITIONS = 64  # ordering keys hash into this many (0004_ordered_delivery.sql)
# Outbox-Sequence is (claim << CLAIM_SHIFT) + place in the claim (0005_causal_ordering.sql).
CLAIM_SHIFT = 20


@dataclass(frozen=True, slots=True)
class Names:
    """Every database object the relay touches, derived from one schema name."""

    schema: str = "noetl"

    def __post_init__(self) -> None:
        # The longest derived name must still fit, or PostgreSQL would truncate it
        # silently and two installs could collide.
        longest = f"{self.schema}.event_outbox_dead_letter"
        if not self.schema or len(longest.encode()) > _MAX_IDENTIFIER_BYTES:
            raise ConfigError(
                f"schema name {self.schema!r} must be 1 to "
                f"{_MAX_IDENTIFIER_BYTES - len('.event_outbox_dead_letter')} bytes"
            )
        if "\x00" in self.schema:
            raise ConfigError("schema name must not contain a NUL character")
        if "$" in self.schema:
            # Our functions' bodies are dollar-quoted and name the schema inside.
            raise ConfigError(f"schema name {self.schema!r} must not contain '$'")
        if "%" in self.schema:
            # Queries with parameters read '%' as a placeholder, even inside a name.
            raise ConfigError(f"schema name {self.schema!r} must not contain '%'")

    @property
    def lock_object(self) -> int:
        """Second key of our advisory locks: one set of locks per schema."""
        # pg_locks shows the key's halves as oid (unsigned); keep it non-negative.
        return zlib.crc32(self.channel.encode()) & 0x7FFFFFFF

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel, derived so relay and trigger always agree."""
        return f"{self.schema}.event_outbox"

    @property
    def migrations_table(self) -> str:
        """Qualified, quoted name as text, for ``to_regclass``."""
        return self._qualified("event_outbox_migration").as_string()

    @property
    def event_table(self) -> str:
        """Qualified, quoted name as text, for ``to_regclass``."""
        return self._qualified("event").as_string()

    @property
    def instance_sequence(self) -> str:
        """Qualified, quoted name as text, for ``nextval``."""
        return self._qualified("event_outbox_instance").as_string()

    def role(self, purpose: str) -> str:
        """The group role for ``purpose`` (producer, relay, operator) of this schema."""
        return f"{self.schema}_outbox_{purpose}"

    def identifiers(self) -> dict[str, sql.Composable]:
        q = self._qualified
        return {
            **{f"{p}_role": sql.Identifier(self.role(p)) for p in ROLE_PURPOSES},
            "schema": sql.Identifier(self.schema),
            "event_table": q("event"),
            "event_table_literal": sql.Literal(q("event").as_string()),
            "event_default_partition_literal": sql.Literal(q("event_default").as_string()),
            "outbox_table": q("event_outbox"),
            "outbox_table_literal": sql.Literal(q("event_outbox").as_string()),
            "dead_letter_table": q("event_outbox_dead_letter"),
            "lag_view": q("event_outbox_lag"),
            "payload_function": q("event_outbox_payload"),
            "migrations_table": q("event_outbox_migration"),
            "enqueue_function": q("event_outbox_enqueue"),
            "notify_function": q("event_outbox_notify"),
            "claim_sequence": q("event_outbox_claim"),
            "claim_sequence_literal": sql.Literal(q("event_outbox_claim").as_string()),
            "claim_fence_function": q("event_outbox_claim_fence"),
            "headers_valid_function": q("event_outbox_headers_valid"),
            "wire_size_function": q("event_outbox_wire_size"),
            "unpadded_function": q("event_outbox_unpadded"),
            "instance_sequence": q("event_outbox_instance"),
            "channel": sql.Identifier(self.channel),
            "idle_lock": sql.SQL("{}, {}").format(
                sql.Literal(IDLE_LOCK_CLASS), sql.Literal(self.lock_object)
            ),
            "idle_lock_class": sql.Literal(IDLE_LOCK_CLASS),
            "lock_object": sql.Literal(self.lock_object),
            "schema_literal": sql.Literal(self.schema),
            "key_lock_class": sql.Literal(KEY_LOCK_CLASS),
            "member_lock_class": sql.Literal(MEMBER_LOCK_CLASS),
            "member_lock": sql.SQL("{}, {}").format(
                sql.Literal(MEMBER_LOCK_CLASS), sql.Literal(self.lock_object)
            ),
            "partition_lock_class": sql.Literal(PARTITION_LOCK_CLASS),
            "claimed_lock_class": sql.Literal(CLAIMED_LOCK_CLASS),
            "channel_literal": sql.Literal(self.channel),
        }

    def _qualified(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)


def ordering_key_of(table: str, column: str | None) -> sql.Composable:
    """An event's ordering key in SQL: its key column as text (NULL: unkeyed)."""
    if column is None:
        return sql.NULL
    return sql.SQL("{}::text").format(sql.Identifier(table, column))


def render(text: str, names: Names, **extra: sql.Composable) -> sql.Composed:
    """Fill a query's identifier placeholders."""
    return sql.SQL(_trusted(text)).format(**names.identifiers(), **extra)


def query(name: str, names: Names, **extra: sql.Composable) -> sql.Composed:
    """The named query from ``sql/queries.sql``, rendered for ``names``."""
    return render(_named_queries()[name], names, **extra)


@cache
def _named_queries() -> dict[str, str]:
    text = (SQL_DIR / "queries.sql").read_text(encoding="utf-8")
    parts = _QUERY_HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {
        name: _COMMENT_LINE.sub("", body).strip()
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def compiled(statement: sql.Composed) -> bytes:
    """``statement`` as the bytes psycopg sends: a query run at every batch is then
    converted once (psycopg caches the conversion of bytes, not of composed SQL)."""
    return statement.as_bytes(None)


def _trusted(text: str) -> LiteralString:
    """Mark text read from our own ``sql/`` files as query text (not user input)."""
    return text  # mypy treats LiteralString as str; the marker is for readers and pyright
