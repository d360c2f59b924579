"""JetStream fast-ingest batch publish (ADR-50, nats-server 2.14): the rules the
relay's fastest path follows.

No batch headers: every message of a batch carries the batch in its reply subject,
``<inbox>.<batch id>.<flow>.<gap mode>.<sequence>.<operation>.$FI``. The server
stores each message as it arrives (deduplicating ``Nats-Msg-Id`` one by one, unlike
an atomic batch), in order, and answers on the reply subject of the message that
prompted the answer, in JSON:

- ``{"type": "ack", "seq": S, "msgs": F}``: the first message, then every F more
  (F at most the flow asked for; the server caps it). The sender keeps at most
  :data:`WINDOWS` x F messages unacknowledged.
- ``{"type": "err", "seq": S, "error": {...}}``: message S was refused (gap mode
  ``fail``: the batch ends there; S-1 messages were stored), and a PubAck follows.
- ``{"type": "gap", ...}``: the server missed a message; the batch ends likewise.
- ``{"stream": ..., "seq": ..., "batch": ..., "count": N}``: the PubAck ending the
  batch; its first N messages are in the stream.
- ``{"error": {...}}``: the message was refused outside a batch (e.g. 10205, the
  stream does not allow batches).

Protocol rules here; :mod:`~outbox_relay.publish_fast` does the I/O.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
import orjson

SUPPORTED_SINCE = (2, 14, 0)
# The server caps every batch's flow at 500 messages per acknowledgement.
MAX_FLOW = 500
WINDOWS = 2  # flow windows unacknowledged at most (ADR-50 clients' default)
# Answers that mean fast batches cannot work here: the stream does not allow them
# (10205), or the server reads our reply subjects otherwise (10206, 10207).
BATCHING_REFUSED = frozenset({10205, 10206, 10207})


class Operation(enum.IntEnum):
    START = 0
    APPEND = 1
    COMMIT = 2  # store this message and end the batch
    CLOSE = 3  # end the batch without storing this message
    PING = 4  # ask again for the latest flow acknowledgement


def server_supports(version: tuple[int, int, int]) -> bool:
    """Whether a nats-server of ``version`` takes fast-ingest batches."""
    return version >= SUPPORTED_SINCE


def operation(sequence: int, size: int) -> Operation:
    """The operation of the ``sequence``-th message (from 1) of a batch of ``size``."""
    if sequence == size:
        return Operation.COMMIT
    return Operation.START if sequence == 1 else Operation.APPEND


def reply_subject(prefix: str, sequence: int, op: Operation) -> str:
    """``prefix`` is ``<inbox>.<batch id>.<flow>.fail.``, the same for the whole batch."""
    return f"{prefix}{sequence}.{int(op)}.$FI"


def batch_prefix(inbox: str, batch_id: str, flow: int) -> str:
    return f"{inbox}.{batch_id}.{flow}.fail."


def answered_message(tail: str) -> tuple[str, int]:
    """The batch id and the sequence in a reply subject past the inbox's dot:
    ``<batch id>.<flow>.<gap>.<sequence>.<operation>.$FI``; sequence 0 if unreadable."""
    tokens = tail.split(".")
    try:
        return tokens[0], int(tokens[3])
    except (IndexError, ValueError):
        return tokens[0], 0


@dataclass(frozen=True, slots=True)
class FlowAck:
    acknowledged: int  # messages of the batch the server has taken so far
    flow: int  # the flow the server granted


@dataclass(frozen=True, slots=True)
class Refused:
    """The batch ended at message ``sequence`` (from 1), refused with ``error``; or,
    ``sequence`` 0 and no error, because the server missed a message (a gap)."""

    sequence: int
    error: nats.js.errors.APIError | None


@dataclass(frozen=True, slots=True)
class Stored:
    count: int  # the batch's first ``count`` messages are in the stream


Answer = FlowAck | Refused | Stored | nats.js.errors.APIError


def parse_answer(data: bytes) -> Answer:
    """One answer of the server to a fast batch (never raises)."""
    try:
        reply = orjson.loads(data)
        kind = reply.get("type")
        if kind == "ack":
            return FlowAck(int(reply["seq"]), max(1, int(reply["msgs"])))
        if kind == "err":
            return Refused(int(reply["seq"]), _api_error(reply["error"]))
        if kind == "gap":
            return Refused(0, None)
        if "error" in reply:
            return _api_error(reply["error"])
        return Stored(int(reply["count"]))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        return nats.js.errors.APIError(description=f"unreadable fast-batch answer: {exc}")


def _api_error(error: dict[str, Any]) -> nats.js.errors.APIError:
    return nats.js.errors.APIError(
        code=error.get("code"), err_code=error.get("err_code"), description=error.get("description")
    )


@dataclass(slots=True)
class BatchState:
    """What the server has said so far about one fast-ingest batch."""

    flow: int
    acknowledged: int = 0
    answered: bool = False  # the server took the first message as a batch's start
    refused: Refused | None = None
    stored: int | None = None  # the closing PubAck's count
    error: nats.js.errors.APIError | None = None  # refused outside a batch
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ended(self) -> bool:
        return self.stored is not None or self.error is not None

    def take(self, sequence: int, answer: Answer) -> None:
        """The server's ``answer`` to message ``sequence`` of the batch."""
        if isinstance(answer, FlowAck):
            self.answered = True
            self.acknowledged = max(self.acknowledged, answer.acknowledged)
            self.flow = answer.flow  # the server may grant less than asked
        elif isinstance(answer, Stored):
            self.stored = answer.count
        elif self.refused is not None:
            pass  # what follows a refusal ("batch unknown") says nothing new
        elif isinstance(answer, Refused):
            self.refused = answer
        elif sequence > 1 or self.answered:
            # A message refused before it joined the batch (too large for the stream,
            # say): the batch ends there, and the server's PubAck follows.
            self.refused = Refused(sequence, answer)
        else:
            self.error = answer  # the batch never started: the stream refused it


def refused(batch: BatchState) -> bool:
    return batch.refused is not None


def window_open(sent: int, batch: BatchState) -> bool:
    """Fewer than the allowed windows of the ``sent`` messages await acknowledgement."""
    return batch.acknowledged + batch.flow * WINDOWS > sent or batch.refused is not None
