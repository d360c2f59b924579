"""What the server's answers mean for a batch's rows: pure, tested without a server.

A publish error is the row's fault (an attempt against it, then the dead letters) or
the servers' (the row waits, untouched); a PubAck is parsed here from its bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
import orjson

from outbox_relay.store import Failure, OutboxMessage

STATUS_HEADER = "Status"
NO_RESPONDERS_STATUS = "503"
# JetStream API errors that are about the server's state, not the message: retried
# after an outage backoff, without counting against the row. 429 is overload and flow
# control (10167: too many messages queued for the stream); 503 is unavailability.
_TOO_MANY_REQUESTS = 429
_TOO_MANY_REQUESTS_ERR_CODE = 10167
_TRANSIENT_API_CODES = frozenset({_TOO_MANY_REQUESTS, 503})
_TRANSIENT_API_ERR_CODES = frozenset({10008, 10023, 10077, 10094, _TOO_MANY_REQUESTS_ERR_CODE})

NO_PUBACK = "no PubAck before the publish timeout"
NO_FLOW_ACK = "no flow acknowledgement before the publish timeout"


class Kind(enum.Enum):
    ROW = "row"  # the message itself is at fault: counts as an attempt
    TRANSIENT = "transient"  # the servers are: retry later, the row untouched
    NO_STREAM = "no_stream"  # nothing answered: either no stream binds it, or the stream is gone


_ROW_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (nats.errors.MaxPayloadError, "payload exceeds the server's max_payload"),
    (nats.errors.BadSubjectError, "NATS refused the subject"),
    (nats.errors.BadHeaderError, "NATS refused a header name"),
)


def classify(exc: BaseException) -> tuple[Kind, str]:
    """Whether a publish error is the row's fault, and a reason fit for an operator."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return Kind.NO_STREAM, "no stream answered for the subject"
    if isinstance(exc, nats.js.errors.APIError):
        reason = f"JetStream refused the message: {exc.description} (err_code {exc.err_code})"
        transient = exc.code in _TRANSIENT_API_CODES or exc.err_code in _TRANSIENT_API_ERR_CODES
        return (Kind.TRANSIENT if transient else Kind.ROW), reason
    for error_type, reason in _ROW_ERRORS:
        if isinstance(exc, error_type):
            return Kind.ROW, reason
    if isinstance(exc, TimeoutError):
        return Kind.TRANSIENT, NO_PUBACK
    return Kind.TRANSIENT, f"{type(exc).__name__}: {exc}"


def overloaded(error: BaseException) -> bool:
    """JetStream's flow control: too many requests in flight (429, err_code 10167)."""
    return isinstance(error, nats.js.errors.APIError) and (
        error.code == _TOO_MANY_REQUESTS or error.err_code == _TOO_MANY_REQUESTS_ERR_CODE
    )


@dataclass(slots=True)
class BatchResult:
    published: list[int] = field(default_factory=list)
    duplicates: int = 0
    failures: list[Failure] = field(default_factory=list)
    # Rows left as they are because of a server-side problem, and the first reason.
    transient: int = 0
    transient_reason: str = ""
    # Frames written that the server never answered: they may still be on the way.
    unanswered: bool = False
    # The stream itself is gone (deleted under the relay): rows wait until it is back.
    stream_missing: bool = False

    def add_transient(self, reason: str) -> None:
        self.transient += 1
        if not self.transient_reason:
            self.transient_reason = reason
        if reason in (NO_PUBACK, NO_FLOW_ACK):
            self.unanswered = True

    def record_error(self, message: OutboxMessage, exc: BaseException) -> None:
        """A publish error for ``message``: the row's failure, or the servers'."""
        kind, reason = classify(exc)
        if kind is Kind.ROW:
            self.failures.append(Failure(message.id, reason))
        else:
            self.add_transient(reason)


@dataclass(frozen=True, slots=True)
class Ack:
    stream: str
    seq: int
    duplicate: bool
    count: int = 0  # messages the PubAck commits: an atomic batch's size, else 0


def parse_ack(data: bytes, status: str | None) -> Ack | Exception:
    """A PubAck reply as an :class:`Ack`, or the error it carries (never raised)."""
    if status == NO_RESPONDERS_STATUS:
        return nats.js.errors.NoStreamResponseError()
    try:
        reply = orjson.loads(data)
        if "error" in reply:
            error = reply["error"]
            return nats.js.errors.APIError(
                code=error.get("code"),
                err_code=error.get("err_code"),
                description=error.get("description"),
            )
        return Ack(
            reply["stream"],
            int(reply["seq"]),
            bool(reply.get("duplicate", False)),
            int(reply.get("count", 0)),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return nats.js.errors.APIError(description=f"unreadable PubAck: {exc}")
