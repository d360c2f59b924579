"""The producer API: write to the outbox inside the caller's own transaction.

Each call is a single SQL statement, so it is atomic even on an autocommit
connection, and nothing reaches the stream unless the caller's transaction commits.
The statement-level trigger on the outbox wakes the relay at commit.

Statements are prepared by pure functions shared by the sync and async twins; the
twins only execute them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from outbox_relay.config import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_ORDERING_KEY,
    DEFAULT_SCHEMA,
    DEFAULT_SUBJECT_PREFIX,
)
from outbox_relay.errors import (
    ConfigError,
    InvalidHeadersError,
    InvalidSubjectError,
    PayloadTooLargeError,
)
from outbox_relay.ids import (
    LEASED_INSTANCE_BITS,
    LEASED_INSTANCES,
    SnowflakeGenerator,
    leased_instance,
    refuse_noetls_shard,
    shard_id_from_env,
)
from outbox_relay.queries import Names, ordering_key_of, query
from outbox_relay.subjects import event_subject, validate_subject

# Headers the relay sets on every message; a producer must not override them.
RESERVED_HEADERS = frozenset({"nats-msg-id", "nats-expected-stream"})
_HEADER_KEY = re.compile(r"^[!-9;-~]+$")  # printable ASCII without ':' (RFC 7230 token-ish)
# W3C Trace Context: version-trace_id-parent_id-flags, lowercase hex, ids not all zero.
_TRACEPARENT = re.compile(
    r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"
)

Headers = Mapping[str, str]
_Statement = tuple[sql.Composed, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Producer:
    """Writes events and messages to the outbox of one schema."""

    schema: str = DEFAULT_SCHEMA
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    max_payload: int = DEFAULT_MAX_PAYLOAD
    # None: lease an instance number from the database on first use (see ids.py).
    ids: SnowflakeGenerator | None = None
    # The event column whose value orders an event's delivery among its key's
    # (README: Ordering); None leaves events unordered.
    ordering_key: str | None = DEFAULT_ORDERING_KEY
    names: Names = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", Names(self.schema))
        validate_subject(self.subject_prefix)
        if self.max_payload < 1:
            raise ConfigError("max payload must be at least 1 byte")
        if self.ordering_key == "":
            raise ConfigError("ordering key column must be a column name, or None")
        if self.ids is not None:
            refuse_noetls_shard(self.ids)

    @classmethod
    def from_env(cls) -> Producer:
        """Configured by ``OUTBOX_SCHEMA``, ``OUTBOX_SUBJECT_PREFIX``,
        ``OUTBOX_MAX_PAYLOAD``, ``OUTBOX_SHARD_ID`` and ``OUTBOX_ORDERING_KEY`` (an
        event column, ``execution_id`` by default; empty: unordered)."""
        raw_max = os.environ.get("OUTBOX_MAX_PAYLOAD", str(DEFAULT_MAX_PAYLOAD))
        try:
            max_payload = int(raw_max)
        except ValueError:
            raise ConfigError(f"OUTBOX_MAX_PAYLOAD must be an integer, got {raw_max!r}") from None
        shard_id = shard_id_from_env()
        return cls(
            schema=os.environ.get("OUTBOX_SCHEMA", DEFAULT_SCHEMA),
            subject_prefix=os.environ.get("OUTBOX_SUBJECT_PREFIX", DEFAULT_SUBJECT_PREFIX),
            max_payload=max_payload,
            ids=None if shard_id is None else SnowflakeGenerator(shard_id),
            ordering_key=os.environ.get("OUTBOX_ORDERING_KEY", DEFAULT_ORDERING_KEY) or None,
        )

    # -- NoETL events -------------------------------------------------------------

    def emit_event(
        self,
        conn: psycopg.Connection[Any],
        *,
        event_type: str,
        execution_id: int,
        event_id: int | None = None,
        headers: Headers | None = None,
        **columns: Any,
    ) -> int:
        """Insert a ``noetl.event`` row and its outbox row; return the event id.

        The subject is ``<prefix>.<event_type>``, the payload the row as
        ``to_jsonb`` renders it, the ``Nats-Msg-Id`` the event id. Other columns of
        the event table are passed by name; dicts and lists are stored as jsonb.
        """
        if event_id is None:
            ids = self._ids() or self._adopt(_fetch_first(conn, self._lease_statement()))
            event_id = ids.next_id()
        return _execute(
            conn, self._emit_statement(event_type, execution_id, event_id, headers, columns)
        )

    async def emit_event_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        event_type: str,
        execution_id: int,
        event_id: int | None = None,
        headers: Headers | None = None,
        **columns: Any,
    ) -> int:
        """:meth:`emit_event` for an :class:`psycopg.AsyncConnection`."""
        if event_id is None:
            ids = self._ids()
            if ids is None:
                ids = self._adopt(await _fetch_first_async(conn, self._lease_statement()))
            event_id = ids.next_id()
        statement = self._emit_statement(event_type, execution_id, event_id, headers, columns)
        return await _execute_async(conn, statement)

    # -- any message ----------------------------------------------------------------

    def enqueue(
        self,
        conn: psycopg.Connection[Any],
        *,
        subject: str,
        payload: bytes,
        msg_id: str,
        headers: Headers | None = None,
        ordering_key: str | None = None,
    ) -> int:
        """Queue ``payload`` for ``subject`` with ``Nats-Msg-Id: msg_id``; return the queue id.

        Rows with the same ``ordering_key`` are published in commit order.
        """
        return _execute(
            conn, self._enqueue_statement(subject, payload, msg_id, headers, ordering_key)
        )

    async def enqueue_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        subject: str,
        payload: bytes,
        msg_id: str,
        headers: Headers | None = None,
        ordering_key: str | None = None,
    ) -> int:
        """:meth:`enqueue` for an :class:`psycopg.AsyncConnection`."""
        return await _execute_async(
            conn, self._enqueue_statement(subject, payload, msg_id, headers, ordering_key)
        )

    # -- event ids ----------------------------------------------------------------------

    def _ids(self) -> SnowflakeGenerator | None:
        """The configured generator, or the one this process leased for the schema."""
        return self.ids or _leased.get(self.schema)

    def _lease_statement(self) -> _Statement:
        params = {"sequence": self.names.instance_sequence, "instances": LEASED_INSTANCES}
        return query("lease_instance", self.names), params

    def _adopt(self, lease: int) -> SnowflakeGenerator:
        leased = SnowflakeGenerator(leased_instance(lease), instance_bits=LEASED_INSTANCE_BITS)
        return _leased.setdefault(self.schema, leased)

    # -- statements (pure) -------------------------------------------------------------

    def _emit_statement(
        self,
        event_type: str,
        execution_id: int,
        event_id: int,
        headers: Headers | None,
        columns: Mapping[str, Any],
    ) -> _Statement:
        row = {
            **columns,
            "execution_id": execution_id,
            "event_id": event_id,
            "event_type": event_type,
        }
        params = {f"col_{name}": _adapt(value) for name, value in row.items()}
        params |= {
            "subject": event_subject(self.subject_prefix, event_type),
            "headers": _headers_param(headers),
            "max_payload": self.max_payload,
        }
        statement = query(
            "emit_event",
            self.names,
            columns=sql.SQL(", ").join(sql.Identifier(name) for name in row),
            values=sql.SQL(", ").join(sql.Placeholder(f"col_{name}") for name in row),
            ordering_key=ordering_key_of("event", self.ordering_key),
        )
        return statement, params

    def _enqueue_statement(
        self,
        subject: str,
        payload: bytes,
        msg_id: str,
        headers: Headers | None,
        ordering_key: str | None,
    ) -> _Statement:
        validate_subject(subject)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if len(payload) > self.max_payload:
            raise PayloadTooLargeError(
                f"payload of {len(payload)} bytes exceeds the maximum of {self.max_payload} "
                f"bytes (subject {subject})"
            )
        if not msg_id or any(ch in msg_id for ch in "\r\n\x00"):
            raise InvalidHeadersError(f"invalid msg_id {msg_id!r}: it must be non-empty, one line")
        params = {
            "subject": subject,
            "payload": bytes(payload),
            "event_id": msg_id,
            "headers": _headers_param(headers),
            "max_payload": self.max_payload,
            "ordering_key": ordering_key,
        }
        return query("enqueue", self.names), params


def _headers_param(headers: Headers | None) -> Jsonb | None:
    if not headers:
        return None
    for key, value in headers.items():
        if not _HEADER_KEY.match(key):
            raise InvalidHeadersError(f"invalid header name {key!r}")
        if key.lower() in RESERVED_HEADERS:
            raise InvalidHeadersError(f"header {key!r} is set by the relay and cannot be given")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise InvalidHeadersError(f"header {key!r} must be a one-line string")
        if key.lower() == "traceparent" and not _TRACEPARENT.match(value):
            # Carried to consumers as is: a malformed one would break their traces.
            raise InvalidHeadersError(
                f"traceparent {value!r} is not W3C Trace Context "
                "(00-<32 hex trace id>-<16 hex span id>-<2 hex flags>)"
            )
    return Jsonb(dict(headers), dumps=_dumps)


def _adapt(value: Any) -> Any:
    return Jsonb(value, dumps=_dumps) if isinstance(value, dict | list) else value


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _execute(conn: psycopg.Connection[Any], statement: _Statement) -> int:
    """Run a producer statement; its one result is an id."""
    with _translated_errors():
        return _fetch_first(conn, statement)


async def _execute_async(conn: psycopg.AsyncConnection[Any], statement: _Statement) -> int:
    """:func:`_execute` for an :class:`psycopg.AsyncConnection`."""
    with _translated_errors():
        return await _fetch_first_async(conn, statement)


# The caller's connection may build dicts, named tuples or objects from rows (NoETL's
# pool uses dict_row); our own cursor reads plain tuples whatever it is set to.
def _fetch_first(conn: psycopg.Connection[Any], statement: _Statement) -> int:
    with conn.cursor(row_factory=tuple_row) as cur:
        return _first(cur.execute(*statement).fetchone())


async def _fetch_first_async(conn: psycopg.AsyncConnection[Any], statement: _Statement) -> int:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(*statement)
        return _first(await cur.fetchone())


def _first(row: tuple[Any, ...] | None) -> int:
    assert row is not None, "the statement returned no row"
    return int(row[0])


@contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.ProgramLimitExceeded as exc:
        raise PayloadTooLargeError(exc.diag.message_primary or str(exc)) from exc
    except psycopg.errors.CheckViolation as exc:
        if exc.diag.constraint_name == "event_outbox_subject_valid":
            raise InvalidSubjectError(f"invalid subject: {exc.diag.message_primary}") from exc
        raise


# Generators leased per schema by this process. A forked child must lease its own:
# sharing the parent's instance number would mint the parent's ids.
_leased: dict[str, SnowflakeGenerator] = {}
os.register_at_fork(after_in_child=_leased.clear)

_default: Producer | None = None


def default_producer() -> Producer:
    """The producer the module-level functions use, configured from the environment."""
    global _default  # noqa: PLW0603 - one lazily built, process-wide default
    if _default is None:
        _default = Producer.from_env()
    return _default


def emit_event(
    conn: psycopg.Connection[Any], *, event_type: str, execution_id: int, **columns: Any
) -> int:
    """:meth:`Producer.emit_event` with the default producer."""
    return default_producer().emit_event(
        conn, event_type=event_type, execution_id=execution_id, **columns
    )


async def emit_event_async(
    conn: psycopg.AsyncConnection[Any], *, event_type: str, execution_id: int, **columns: Any
) -> int:
    """:meth:`Producer.emit_event_async` with the default producer."""
    return await default_producer().emit_event_async(
        conn, event_type=event_type, execution_id=execution_id, **columns
    )


def enqueue(
    conn: psycopg.Connection[Any],
    *,
    subject: str,
    payload: bytes,
    msg_id: str,
    headers: Headers | None = None,
    ordering_key: str | None = None,
) -> int:
    """:meth:`Producer.enqueue` with the default producer."""
    return default_producer().enqueue(
        conn,
        subject=subject,
        payload=payload,
        msg_id=msg_id,
        headers=headers,
        ordering_key=ordering_key,
    )


async def enqueue_async(
    conn: psycopg.AsyncConnection[Any],
    *,
    subject: str,
    payload: bytes,
    msg_id: str,
    headers: Headers | None = None,
    ordering_key: str | None = None,
) -> int:
    """:meth:`Producer.enqueue_async` with the default producer."""
    return await default_producer().enqueue_async(
        conn,
        subject=subject,
        payload=payload,
        msg_id=msg_id,
        headers=headers,
        ordering_key=ordering_key,
    )
