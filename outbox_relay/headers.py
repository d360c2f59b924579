"""NATS message header rules and sizes, shared by the producer (at write time) and the
relay (the last line of defence, for rows that reached the outbox another way).

Mirrored by the CHECK constraints of sql/migrations/0007_row_checks.sql and
0008_same_rows_every_path.sql, so the SQL path accepts exactly the same rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from outbox_relay.errors import InvalidHeadersError

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
# On keyed rows in ordered mode: the key, and a number that increases along each
# key's messages in the order the relay publishes them (OutboxMessage.sequence).
ORDERING_KEY_HEADER = "Outbox-Ordering-Key"
SEQUENCE_HEADER = "Outbox-Sequence"
# Set by the relay on every message (or every keyed one); a producer must not give them.
RESERVED_HEADERS = frozenset(h.lower() for h in (ORDERING_KEY_HEADER, SEQUENCE_HEADER))
# The server's and the relay's namespace: Nats-Required-Api-Level left whole batches
# unanswered, Nats-Expected-* and Nats-Batch-* headers fight the relay's own.
_SERVER_PREFIX = "nats-"
# RFC 7230 token, as nats-py checks header names before it sends them.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Breaks the header block (CR, LF) or cannot be stored in PostgreSQL text (NUL).
_LINE_BREAKERS = ("\r", "\n", "\x00")
# W3C Trace Context: version-trace_id-parent_id-flags, lowercase hex, ids not all zero.
_TRACEPARENT = re.compile(
    r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"
)
_HEADER_LINE = b"NATS/1.0\r\n"
_CRLF = 2
# Longest stream name JetStream accepts, and digits of the largest sequence: the
# producer does not know the relay's stream, so it reserves room for any.
MAX_STREAM_NAME_BYTES = 255
_MAX_SEQUENCE_DIGITS = len(str(2**63 - 1))


def validate_headers(headers: Any) -> dict[str, str]:
    """``headers`` as a dict if NATS can carry them and the relay does not set them."""
    checked = sendable_headers(headers)
    for name, value in checked.items():
        validate_unpadded(name, value)
        if name.lower() in RESERVED_HEADERS:
            raise InvalidHeadersError(f"header {name!r} is set by the relay and cannot be given")
        if name.lower().startswith(_SERVER_PREFIX):
            raise InvalidHeadersError(
                f"header {name!r}: Nats-* headers are set by the relay and the server, never "
                "by a producer (the relay sets Nats-Msg-Id from the msg id)"
            )
        if name.lower() == "traceparent" and not _TRACEPARENT.match(value):
            # Carried to consumers as is: a malformed one would break their traces.
            raise InvalidHeadersError(
                f"traceparent {value!r} is not W3C Trace Context "
                "(00-<32 hex trace id>-<16 hex span id>-<2 hex flags>)"
            )
    return checked


def sendable_headers(headers: Any) -> dict[str, str]:
    """``headers`` as a dict if a NATS publish can carry them (the relay's check)."""
    if not isinstance(headers, Mapping):
        raise InvalidHeadersError(
            f"headers must be an object of strings, not {type(headers).__name__}"
        )
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidHeadersError(
                f"invalid header name {name!r}: letters, digits and !#$%&'*+-.^_`|~ only"
            )
        if not isinstance(value, str):
            raise InvalidHeadersError(
                f"header {name!r} must be a string, not {type(value).__name__} ({value!r})"
            )
        validate_header_value(name, value)
    return dict(headers)


def validate_header_value(name: str, value: str) -> str:
    """``value`` if it fits on one header line (the msg id and ordering key too)."""
    if value.isascii() and value.isprintable():
        return value  # the common case, once per row: no line break, no NUL, encodable
    if any(ch in value for ch in _LINE_BREAKERS):
        raise InvalidHeadersError(
            f"{name} {value!r} must be a one-line string without NUL characters"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidHeadersError(f"{name} {value!r} is not valid Unicode") from None
    return value


def validate_unpadded(name: str, value: str) -> str:
    """``value`` if it goes out as it is: NATS clients strip blanks around a header
    value, so none may be there. The producer's check; the table's CHECK constraints
    hold every other writer to it, so the relay need not look again."""
    if value != value.strip():
        raise InvalidHeadersError(
            f"{name} {value!r} must not begin or end with a blank: it would be sent stripped"
        )
    return value


def wire_size(headers: Mapping[str, str], payload_size: int) -> int:
    """Bytes the server counts against max_payload: the header block plus the payload.

    nats-py checks only the payload, and a server that receives more than max_payload
    closes the connection; we check the sum so one bad row cannot drop the connection.
    """
    header_size = len(_HEADER_LINE) + _CRLF
    for key, value in headers.items():
        header_size += len(key.encode()) + 2 + len(value.strip().encode()) + _CRLF
    return header_size + payload_size


def over_max_payload(headers: Mapping[str, str], payload_size: int, max_payload: int) -> int:
    """The message's :func:`wire_size` if it exceeds ``max_payload``, else 0.

    Once per row, so a bound first: UTF-8 takes at most 4 bytes a character.
    """
    characters = sum(len(key) + len(value) for key, value in headers.items())
    bound = len(_HEADER_LINE) + _CRLF + 4 * characters + (2 + _CRLF) * len(headers)
    if payload_size + bound <= max_payload:
        return 0
    size = wire_size(headers, payload_size)
    return size if size > max_payload else 0


def header_overhead(
    headers: Mapping[str, str] | None, msg_id: str, ordering_key: str | None
) -> int:
    """Header bytes of the message the relay will send, for any stream name and outbox id."""
    added = {
        **(headers or {}),
        MSG_ID_HEADER: msg_id,
        EXPECTED_STREAM_HEADER: "s" * MAX_STREAM_NAME_BYTES,
    }
    if ordering_key is not None:
        added |= {ORDERING_KEY_HEADER: ordering_key, SEQUENCE_HEADER: "9" * _MAX_SEQUENCE_DIGITS}
    return wire_size(added, 0)
