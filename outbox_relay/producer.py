"""The producer API: write to the outbox inside the caller's own transaction.

Each call is a single SQL statement, so it is atomic even on an autocommit
connection, and nothing reaches the stream unless the caller's transaction commits.
The statement-level trigger on the outbox wakes the relay at commit.

Statements are prepared by pure functions shared by the sync and async twins; the
twins only execute them.
"""

from __future__ import annotations

import math
import os
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
    InvalidValueError,
    NotMigratedError,
    OutboxError,
    PayloadTooLargeError,
)
from outbox_relay.headers import (
    header_overhead,
    validate_header_value,
    validate_headers,
    validate_unpadded,
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
        shard_id = shard_id_from_env()
        return cls(
            schema=os.environ.get("OUTBOX_SCHEMA", DEFAULT_SCHEMA),
            subject_prefix=os.environ.get("OUTBOX_SUBJECT_PREFIX", DEFAULT_SUBJECT_PREFIX),
            max_payload=max_payload_from_env(),
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
            conn,
            self._emit_statement(event_type, execution_id, event_id, headers, columns),
            self.max_payload,
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
        return await _execute_async(conn, statement, self.max_payload)

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
            conn,
            self._enqueue_statement(subject, payload, msg_id, headers, ordering_key),
            self.max_payload,
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
            conn,
            self._enqueue_statement(subject, payload, msg_id, headers, ordering_key),
            self.max_payload,
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
        # The key's own bytes are taken off in SQL, where its value is rendered.
        key_reserved = "" if self.ordering_key else None
        params |= {
            "subject": event_subject(self.subject_prefix, event_type),
            "headers": _headers_param(headers),  # checked before they are measured
            "max_payload": self._payload_budget(headers, str(event_id), key_reserved),
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
        _validate_msg_id(msg_id)
        if ordering_key is not None:
            validate_unpadded("ordering key", validate_header_value("ordering key", ordering_key))
        headers_param = _headers_param(headers)  # checked before they are measured
        budget = self._payload_budget(headers, msg_id, ordering_key)
        if len(payload) > budget:
            raise PayloadTooLargeError(
                f"payload of {len(payload)} bytes exceeds the maximum of {self.max_payload} "
                f"bytes (subject {subject}) {self._budget_note(budget)}"
            )
        params = {
            "subject": subject,
            "payload": bytes(payload),
            "event_id": msg_id,
            "headers": headers_param,
            "max_payload": budget,
            "ordering_key": ordering_key,
        }
        return query("enqueue", self.names), params

    def _payload_budget(
        self, headers: Headers | None, msg_id: str, ordering_key: str | None
    ) -> int:
        """Payload bytes left of ``max_payload`` once the relay has added its headers."""
        budget = self.max_payload - header_overhead(headers, msg_id, ordering_key)
        if budget < 1:
            raise PayloadTooLargeError(
                f"the headers alone exceed the maximum of {self.max_payload} bytes "
                f"{self._budget_note(budget)}"
            )
        return budget

    def _budget_note(self, budget: int) -> str:
        return (
            f"once the relay adds {self.max_payload - budget} bytes of headers; the maximum "
            "(OUTBOX_MAX_PAYLOAD) must not exceed the NATS server's max_payload"
        )


def max_payload_from_env() -> int:
    """The producers' message maximum: ``OUTBOX_MAX_PAYLOAD``, 1 MiB by default."""
    raw_max = os.environ.get("OUTBOX_MAX_PAYLOAD", str(DEFAULT_MAX_PAYLOAD))
    try:
        return int(raw_max)
    except ValueError:
        raise ConfigError(f"OUTBOX_MAX_PAYLOAD must be an integer, got {raw_max!r}") from None


def _validate_msg_id(msg_id: str) -> None:
    # Also the JetStream dedupe key: nats-py strips a header value, so blanks around
    # it would change the id, and a blank one would turn deduplication off.
    if not isinstance(msg_id, str) or not msg_id.strip() or msg_id != msg_id.strip():
        raise InvalidHeadersError(
            f"invalid msg_id {msg_id!r}: it must be a non-empty string without blanks around it"
        )
    validate_header_value("msg_id", msg_id)
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in msg_id):
        raise InvalidHeadersError(f"invalid msg_id {msg_id!r}: no control characters")


def _headers_param(headers: Headers | None) -> Jsonb | None:
    if headers is None:
        return None
    return _jsonb(validate_headers(headers)) if headers else None


def _adapt(value: Any) -> Any:
    return _jsonb(value) if isinstance(value, dict | list) else value


def _jsonb(value: Any) -> Jsonb:
    """``value`` as jsonb, refused here unless jsonb stores it as given."""
    _check_json(value)
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:  # a 2**70, a non-str key, a surrogate, ...
        raise InvalidValueError(f"cannot store {_short(value)} as jsonb: {exc}") from None
    return Jsonb(value, dumps=lambda _: text)


def _check_json(value: Any) -> None:
    # orjson writes NaN and Infinity as null, and jsonb refuses \u0000: both would be
    # a silent change or a late database error.
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidValueError(f"{value} cannot be stored in jsonb (JSON has no NaN or Infinity)")
    if isinstance(value, str) and "\x00" in value:
        raise InvalidValueError(f"{_short(value)} cannot be stored in jsonb: it contains NUL")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(key)
            _check_json(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json(item)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _execute(conn: psycopg.Connection[Any], statement: _Statement, max_payload: int) -> int:
    """Run a producer statement; its one result is an id."""
    with _translated_errors(max_payload):
        return _fetch_first(conn, statement)


async def _execute_async(
    conn: psycopg.AsyncConnection[Any], statement: _Statement, max_payload: int
) -> int:
    """:func:`_execute` for an :class:`psycopg.AsyncConnection`."""
    with _translated_errors(max_payload):
        return await _fetch_first_async(conn, statement)


# The caller's connection may build dicts, named tuples or objects from rows (NoETL's
# pool uses dict_row); our own cursor reads plain tuples whatever it is set to.
def _fetch_first(conn: psycopg.Connection[Any], statement: _Statement) -> int:
    with _migrated(), conn.cursor(row_factory=tuple_row) as cur:
        return _first(cur.execute(*statement).fetchone())


async def _fetch_first_async(conn: psycopg.AsyncConnection[Any], statement: _Statement) -> int:
    with _migrated():
        async with conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(*statement)
            return _first(await cur.fetchone())


@contextmanager
def _migrated() -> Iterator[None]:
    """A producer used before ``migrate`` gets the step it missed, not a raw error."""
    try:
        yield
    except (
        psycopg.errors.InvalidSchemaName,
        psycopg.errors.UndefinedFunction,
        psycopg.errors.UndefinedTable,
    ) as exc:
        raise NotMigratedError(
            f"{exc.diag.message_primary or exc}: run `outbox-relay migrate` (the same "
            "database and schema) before producing"
        ) from exc


def _first(row: tuple[Any, ...] | None) -> int:
    assert row is not None, "the statement returned no row"
    return int(row[0])


@contextmanager
def _translated_errors(max_payload: int) -> Iterator[None]:
    try:
        yield
    except psycopg.errors.ProgramLimitExceeded as exc:
        # The function was given what the relay's headers leave of max_payload.
        raise PayloadTooLargeError(
            f"message exceeds the maximum of {max_payload} bytes once the relay adds its "
            f"headers ({exc.diag.message_primary or exc})"
        ) from exc
    except psycopg.errors.CheckViolation as exc:
        error = _CONSTRAINT_ERRORS.get(exc.diag.constraint_name or "")
        if error is None:
            raise
        raise error(f"{exc.diag.message_primary} ({exc.diag.constraint_name})") from exc
    except (psycopg.DataError, psycopg.errors.DatatypeMismatch) as exc:
        # An integer out of its column's range, a scalar for a jsonb column, ...
        raise InvalidValueError(str(exc).strip().splitlines()[0]) from exc


# The outbox table's CHECK constraints (sql/migrations), as the producer's errors.
_CONSTRAINT_ERRORS: dict[str, type[OutboxError]] = {
    "event_outbox_subject_valid": InvalidSubjectError,
    "event_outbox_subject_length": InvalidSubjectError,
    "event_outbox_event_id_valid": InvalidHeadersError,
    "event_outbox_headers_object": InvalidHeadersError,
    "event_outbox_headers_valid": InvalidHeadersError,
    "event_outbox_ordering_key_valid": InvalidHeadersError,
    "event_outbox_wire_size": PayloadTooLargeError,
}


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
