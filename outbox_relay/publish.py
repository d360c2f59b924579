"""Publish a claimed batch to JetStream, pipelined, and sort out what each PubAck says.

The classification is pure (:func:`classify`), so it is tested without a server; the
:class:`Publisher` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from outbox_relay import atomic, fast_ingest, frames
from outbox_relay.errors import OutboxError
from outbox_relay.failpoints import AFTER_PUBLISH, armed, failpoint
from outbox_relay.headers import (
    EXPECTED_STREAM_HEADER,
    MSG_ID_HEADER,
    ORDERING_KEY_HEADER,
    SEQUENCE_HEADER,
    over_max_payload,
    sendable_headers,
    validate_header_value,
    wire_size,
)
from outbox_relay.jetstream import reset_connection
from outbox_relay.store import Failure, OutboxMessage
from outbox_relay.subjects import subject_matches, validate_subject

log = logging.getLogger(__name__)

__all__ = [
    "EXPECTED_STREAM_HEADER",
    "MSG_ID_HEADER",
    "ORDERING_KEY_HEADER",
    "SEQUENCE_HEADER",
    "wire_size",
]

STATUS_HEADER = "Status"
NO_RESPONDERS_STATUS = "503"
# JetStream API errors that are about the server's state, not the message: retried
# after an outage backoff, without counting against the row. 429 is overload and flow
# control (10167: too many messages queued for the stream); 503 is unavailability.
_SUBJECTS_REMEMBERED = 10_000  # distinct subjects (event types): a few, usually
_TOO_MANY_REQUESTS = 429
_TOO_MANY_REQUESTS_ERR_CODE = 10167
_TRANSIENT_API_CODES = frozenset({_TOO_MANY_REQUESTS, 503})
_TRANSIENT_API_ERR_CODES = frozenset({10008, 10023, 10077, 10094, _TOO_MANY_REQUESTS_ERR_CODE})


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


def _overloaded(error: BaseException) -> bool:
    """JetStream's flow control: too many requests in flight (429, err_code 10167)."""
    return isinstance(error, nats.js.errors.APIError) and (
        error.code == _TOO_MANY_REQUESTS or error.err_code == _TOO_MANY_REQUESTS_ERR_CODE
    )


# A row's subject is one of a few (its event type): checked once each, not per row.
_validate_subject = functools.lru_cache(maxsize=_SUBJECTS_REMEMBERED)(validate_subject)


def message_headers(message: OutboxMessage, stream: str, *, ordered: bool) -> dict[str, str]:
    """The headers to send; :class:`OutboxError` if the row's own cannot be sent.

    Rows are checked by the outbox's constraints; this is the last line of defence
    for one that got past them (written before them, or with them dropped).
    """
    _validate_subject(message.subject)
    headers = sendable_headers(message.headers) if message.headers is not None else {}
    headers[MSG_ID_HEADER] = validate_header_value("msg id", message.event_id)
    # The server refuses the message unless this stream stores it, so a subject
    # captured by another stream is a row failure, never a silent detour.
    headers[EXPECTED_STREAM_HEADER] = stream
    if ordered and message.ordering_key is not None:
        headers[ORDERING_KEY_HEADER] = validate_header_value("ordering key", message.ordering_key)
        headers[SEQUENCE_HEADER] = str(message.sequence)
    return headers


def waves(
    messages: Sequence[OutboxMessage],
) -> tuple[list[OutboxMessage], dict[str, deque[OutboxMessage]]]:
    """The first wave (keyless rows and each key's first row) and the rest, by key."""
    first: list[OutboxMessage] = []
    later: dict[str, deque[OutboxMessage]] = {}
    for message in messages:
        key = message.ordering_key
        if key is None:
            first.append(message)
        elif key in later:
            later[key].append(message)
        else:
            later[key] = deque()
            first.append(message)
    return first, later


NO_PUBACK = "no PubAck before the publish timeout"
NO_FLOW_ACK = "no flow acknowledgement before the publish timeout"


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

    def add_transient(self, reason: str) -> None:
        self.transient += 1
        if not self.transient_reason:
            self.transient_reason = reason
        if reason in (NO_PUBACK, NO_FLOW_ACK):
            self.unanswered = True


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


class AckInbox:
    """Collects PubAcks on one wildcard inbox, one future per message in flight.

    Stands in for nats-py's ``publish_async``, whose future never resolves when
    JetStream answers with an error (nats-io/nats.py#985): a row the stream refuses
    would look like an outage for ever instead of being retried and dead-lettered.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = ""
        self._next_token = 0
        self._pending: dict[str, asyncio.Future[Ack]] = {}

    async def start(self) -> None:
        self._prefix = f"{self._nc.new_inbox()}."
        await self._nc.subscribe(f"{self._prefix}*", cb=self._on_reply)

    def expect(self) -> tuple[str, asyncio.Future[Ack]]:
        """A reply subject and the future its PubAck will resolve."""
        self._next_token += 1
        token = str(self._next_token)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        return self._prefix + token, future

    def forget(self, reply_subject: str) -> None:
        """Stop waiting for a reply (timed out, or never sent)."""
        future = self._pending.pop(reply_subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.cancel()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return
        outcome = parse_ack(msg.data, msg.headers.get(STATUS_HEADER) if msg.headers else None)
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class FastInbox:
    """The answers to every fast-ingest batch of one connection, on one wildcard."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._root = ""
        self._batches: dict[str, fast_ingest.BatchState] = {}

    async def start(self) -> None:
        self._root = self._nc.new_inbox()
        await self._nc.subscribe(f"{self._root}.>", cb=self._on_answer)

    def open(self, flow: int) -> tuple[str, str, fast_ingest.BatchState]:
        """A new batch: its id, its reply-subject prefix and its state."""
        batch_id = uuid.uuid4().hex
        batch = self._batches[batch_id] = fast_ingest.BatchState(flow)
        return batch_id, fast_ingest.batch_prefix(self._root, batch_id, flow), batch

    def close(self, batch_id: str) -> None:
        self._batches.pop(batch_id, None)

    async def _on_answer(self, msg: Msg) -> None:
        batch_id, sequence = fast_ingest.answered_message(msg.subject[len(self._root) + 1 :])
        batch = self._batches.get(batch_id)
        if batch is None:
            return
        batch.take(sequence, fast_ingest.parse_answer(msg.data))
        batch.changed.set()


# What one publish sends: subject, reply subject, headers, payload.
_Outgoing = tuple[str, str, dict[str, str], bytes]
# nats-py's write buffer, which FrameWriter hands its frames to.
_CLIENT_INTERNALS = (
    "_send_command",
    "_flush_pending",
    "_flush_queue",
    "_pending_data_size",
    "_max_pending_size",
)


class FrameWriter:
    """Publishes a run of messages in one write to nats-py's connection.

    The frames (:mod:`outbox_relay.frames`) go into the client's own write buffer, so
    they keep their place among everything else the client sends, and its flusher
    sends them; the checks are those of ``Client.publish``. A nats-py without those
    internals gets one ``publish`` per message: slower, the same on the wire.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self.batched = all(hasattr(nc, name) for name in _CLIENT_INTERNALS)

    async def publish(self, messages: Sequence[_Outgoing]) -> None:
        nc = self._nc
        if not self.batched:
            for subject, reply, headers, payload in messages:
                await nc.publish(subject, payload, reply=reply, headers=headers)
            return
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        data = b"".join(frames.hpub(*message) for message in messages)
        # Private members, checked for in __init__ (a test fails if they go away).
        pending_limit = nc._max_pending_size
        if not nc.is_connected and (
            pending_limit <= 0 or len(data) + nc._pending_data_size > pending_limit
        ):
            raise nats.errors.OutboundBufferLimitError
        nc.stats["out_msgs"] += len(messages)
        nc.stats["out_bytes"] += sum(len(message[3]) for message in messages)
        await nc._send_command(data)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()


_InFlight = tuple[OutboxMessage, str, asyncio.Future[Ack]]
_Prepared = tuple[OutboxMessage, dict[str, str]]
# An atomic batch awaiting its PubAck: its rows, the commit's reply subject, the future.
_BatchInFlight = tuple[list[OutboxMessage], str, asyncio.Future[Ack]]


class Publisher:
    """Publishes batches to one stream over one NATS connection.

    ``atomic``: the server and the stream take atomic batches (:mod:`outbox_relay.atomic`),
    the fast path; otherwise, and for a batch refused whole, one PubAck per message.
    """

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        timeout: float,
        *,
        ordered: bool,
        atomic: bool = False,
        fast: bool = False,
        subjects: Sequence[str] = (),
    ) -> None:
        self._nc = nc
        # The stream's subjects, where known: a fast batch must not send a row the
        # stream cannot store (another stream would answer it, outside the batch).
        self._subjects = tuple(subjects)
        self._in_stream: dict[str, bool] = {}
        self._ordered = ordered
        self._atomic = atomic
        self._fast = fast
        self._fast_inbox = FastInbox(nc)
        self._js = js
        self._stream = stream
        self._timeout = timeout
        self._acks = AckInbox(nc)
        self._writer = FrameWriter(nc)

    async def start(self) -> None:
        await self._acks.start()
        await self._fast_inbox.start()

    @property
    def atomic(self) -> bool:
        return self._atomic

    @property
    def fast(self) -> bool:
        return self._fast

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def closed(self) -> bool:
        """The client stopped for good (it does not reconnect from here)."""
        return bool(self._nc.is_closed)

    async def close(self) -> None:
        await self._nc.close()

    async def stream_exists(self) -> bool:
        """Whether the stream is there (False too when JetStream does not answer)."""
        try:
            # nats-py's own timeout does not cover a write stuck on a silent link.
            with anyio.fail_after(self._timeout):
                await self._js.stream_info(self._stream)
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    async def publish_batch(
        self,
        messages: Sequence[OutboxMessage],
        *,
        send_until: float | None = None,
    ) -> BatchResult:
        """Publish a claimed batch: as a fast-ingest batch or as atomic batches where
        the stream takes them, and one message at a time for the rest (a batch refused
        whole, or neither kind of batch allowed).

        ``send_until`` (monotonic time) fences a relay whose claim may have lapsed:
        nothing starts after it, and the rows not sent stay in the outbox.
        """
        result = BatchResult()
        rest = messages
        if self._fast:
            rest = await self._publish_fast(rest, result, send_until)
        if rest and not result.transient and self._atomic:
            rest = await self._publish_atomic(rest, result, send_until)
        if rest and not result.transient:
            await self._publish_one_by_one(rest, result, send_until)
        if result.unanswered:
            self._reset_link()
        return result

    def _reset_link(self) -> None:
        """Drop the connection with a reset, so that no frame written on it and not yet
        delivered (a stalled link keeps them in the kernel's send queue, a blocked
        flush in nats-py's) can reach the server after the rows are given back and
        published again, perhaps by another relay: late, out of order, past the
        duplicate window. nats-py reconnects."""
        if reset_connection(self._nc):
            log.warning(
                "publish unanswered: connection to NATS reset, nothing sent on it can arrive"
            )
        else:
            log.warning(
                "publish unanswered: a WebSocket connection cannot be reset; frames it "
                "still holds may arrive late"
            )

    async def _publish_fast(
        self, messages: Sequence[OutboxMessage], result: BatchResult, send_until: float | None
    ) -> Sequence[OutboxMessage]:
        """Send ``messages`` as fast-ingest batches; return the rows for the next path.

        The server stores a batch's messages in order as they arrive, each deduplicated
        on its own, and ends the batch at the first it refuses: the rows before it are
        in, that row's failure is recorded, and the rows after it go out in the next
        batch (ordered, without the rest of the refused row's key).

        A row whose subject the stream does not bind is never sent in a batch (another
        stream, or none, would answer it, outside the batch): it goes to the next path,
        after the batches, which tells why the server refuses it.
        """
        outside: list[OutboxMessage] = []
        prepared: Sequence[_Prepared] = self._prepare_all(messages, result, outside=outside)
        while prepared:
            if send_until is not None and time.monotonic() > send_until:
                return []  # the rows not sent stay in the outbox
            prepared, next_path = await self._fast_batch(prepared, result)
            if next_path:
                break
        if outside and self._ordered and result.failures:
            # A key whose row failed in a batch holds back its later rows, these too.
            failed = {failure.id for failure in result.failures}
            held = {m.ordering_key for m in messages if m.id in failed}
            outside = [m for m in outside if m.ordering_key not in held]
        return [*(message for message, _ in prepared), *outside]

    async def _fast_batch(
        self, prepared: Sequence[_Prepared], result: BatchResult
    ) -> tuple[Sequence[_Prepared], bool]:
        """One fast-ingest batch: the rows still to send, and whether they are for the
        next path (True) or for another fast batch."""
        batch_id, prefix, batch = self._fast_inbox.open(min(len(prepared), fast_ingest.MAX_FLOW))
        try:
            sent = await self._send_fast(prepared, prefix, batch, result)
            if sent:
                await self._after_send()
                await self._until(batch, fast_ingest.refused)
                if batch.refused is not None and not batch.ended:
                    # Refused before it joined the batch, the last message sent: the
                    # server answers the batch only once it sees a message after it.
                    await self._close_fast(prefix, sent + 1, prepared[0][0].subject)
                    await self._until(batch)
        finally:
            self._fast_inbox.close(batch_id)
        if result.transient:
            return [], False
        if not sent:
            return prepared, True
        return self._fast_outcome(batch, prepared, result)

    async def _close_fast(self, prefix: str, sequence: int, subject: str) -> None:
        with contextlib.suppress(nats.errors.Error):  # then the PubAck's wait times out
            await self._nc.publish(
                subject,
                b"",
                reply=fast_ingest.reply_subject(prefix, sequence, fast_ingest.Operation.CLOSE),
            )

    def _fast_outcome(
        self, batch: fast_ingest.BatchState, prepared: Sequence[_Prepared], result: BatchResult
    ) -> tuple[Sequence[_Prepared], bool]:
        """What the server's answers to a batch sent whole mean for its rows."""
        if batch.stored is None:
            if batch.error is None:
                for _ in prepared:
                    result.add_transient(NO_PUBACK)
                return [], False
            if batch.error.err_code in fast_ingest.BATCHING_REFUSED:
                self._stop_fast(classify(batch.error)[1])
            return prepared, True  # anything already stored deduplicates there
        stored = min(batch.stored, len(prepared))
        result.published.extend(message.id for message, _ in prepared[:stored])
        rest = prepared[stored:]
        refused = batch.refused
        if refused is None or refused.error is None or refused.sequence != stored + 1:
            # A gap, or an answer we cannot place: the next path sorts the rest out.
            return rest, True
        failed = rest[0][0]
        self._record_error(result, failed, refused.error)
        if result.transient:
            return [], False
        rest = rest[1:]
        if self._ordered and failed.ordering_key is not None:
            rest = [(m, h) for m, h in rest if m.ordering_key != failed.ordering_key]
        return rest, False

    async def _send_fast(
        self,
        prepared: Sequence[_Prepared],
        prefix: str,
        batch: fast_ingest.BatchState,
        result: BatchResult,
    ) -> int:
        """Send one fast-ingest batch within its flow window: how many messages went
        out, 0 if it could not start (the rows for the next path, or an outage,
        recorded as transient)."""
        size = len(prepared)
        sent = 0
        while sent < size:
            if batch.ended or batch.refused is not None:
                break  # the server ended it: the closing PubAck says what it stored
            # The server's flow acknowledgements pace the sending: up to the window's
            # edge in one write. Not waiting for the first one saves a round trip per
            # claim (200 ms on a slow link); a stream that refuses batches, rare,
            # answers every message so, and the rows go to the next path.
            upto = min(size, batch.acknowledged + batch.flow * fast_ingest.WINDOWS)
            if upto <= sent:
                done = functools.partial(fast_ingest.window_open, sent)
                if not await self._until(batch, done):
                    for _ in prepared:
                        result.add_transient(NO_FLOW_ACK)
                    return 0
                continue
            outgoing = [
                (
                    message.subject,
                    fast_ingest.reply_subject(prefix, number, fast_ingest.operation(number, size)),
                    headers,
                    message.payload,
                )
                for number, (message, headers) in enumerate(prepared[sent:upto], start=sent + 1)
            ]
            try:
                await self._writer.publish(outgoing)
            except Exception as exc:  # noqa: BLE001 - every failure is classified
                kind, reason = classify(exc)
                if kind is Kind.TRANSIENT:
                    for _ in prepared:
                        result.add_transient(reason)
                return 0
            sent = upto
        return sent

    async def _until(
        self,
        batch: fast_ingest.BatchState,
        done: Callable[[fast_ingest.BatchState], bool] | None = None,
    ) -> bool:
        """Wait for the server's answers until ``done(batch)`` or the batch ends: False
        if the publish timeout passed first."""
        with anyio.move_on_after(self._timeout):
            while not (batch.ended or (done and done(batch))):
                batch.changed.clear()
                await batch.changed.wait()
            return True
        return False

    def _stop_fast(self, reason: str) -> None:
        if self._fast:
            self._fast = False
            log.warning("fast-ingest batch publish off for stream %s (%s)", self._stream, reason)

    async def _publish_atomic(
        self, messages: Sequence[OutboxMessage], result: BatchResult, send_until: float | None
    ) -> Sequence[OutboxMessage]:
        """Send ``messages`` as atomic batches; return the rows to send one by one.

        Each batch is stored whole and in order, so every key's rows keep their order
        within it. A batch refused whole (a msg id already stored after a crash, one bad
        row) goes one by one, which isolates the bad row. Ordered, batches go one after
        the other and the first refused sends the rest one by one too, so no key's later
        rows are stored before its earlier ones.
        """
        prepared = self._prepare_all(messages, result)
        max_payload = self._nc.max_payload
        if any(
            wire_size(headers, len(message.payload)) + atomic.BATCH_HEADER_BYTES > max_payload
            for message, headers in prepared
        ):
            # Fits alone but not with the batch headers: rare enough to send all singly.
            return [message for message, _ in prepared]
        batches = atomic.split(prepared)
        if not self._ordered:
            return await self._commit_batches(batches, result, send_until)
        for index, batch in enumerate(batches):
            refused = await self._commit_batches([batch], result, send_until)
            if result.transient:
                return []
            if refused:
                return [*refused, *(m for later in batches[index + 1 :] for m, _ in later)]
        return []

    def _prepare_all(
        self,
        messages: Sequence[OutboxMessage],
        result: BatchResult,
        *,
        outside: list[OutboxMessage] | None = None,
    ) -> list[_Prepared]:
        """The rows that can be sent, with their headers; ordered, a row that cannot
        holds back the later rows of its key (left in the outbox, as a wave would).
        ``outside`` collects, instead, the rows whose subject the stream does not bind
        (they hold back their key likewise)."""
        prepared: list[_Prepared] = []
        held: set[str] = set()
        for message in messages:
            key = message.ordering_key if self._ordered else None
            if key is not None and key in held:
                continue
            headers = self._prepare(message, result)
            if headers is not None and outside is not None and not self._stream_binds(message):
                outside.append(message)
                headers = None
            if headers is not None:
                prepared.append((message, headers))
            elif key is not None:
                held.add(key)
        return prepared

    async def _commit_batches(
        self,
        batches: Sequence[Sequence[_Prepared]],
        result: BatchResult,
        send_until: float | None,
    ) -> list[OutboxMessage]:
        """Send ``batches``, wait for their PubAcks; return the rows of those refused."""
        in_flight: list[_BatchInFlight] = []
        refused: list[OutboxMessage] = []
        for batch in batches:
            if send_until is not None and time.monotonic() > send_until:
                break
            sent = await self._send_batch(batch, result)
            if isinstance(sent, list):
                refused.extend(sent)
            elif sent is not None:
                in_flight.append(sent)
        await self._after_send()
        await self._wait([future for _, _, future in in_flight])
        for rows, reply, future in in_flight:
            if not future.done():
                self._acks.forget(reply)
                for _ in rows:
                    result.add_transient(NO_PUBACK)
                continue
            error = future.exception()
            if error is None and future.result().count == len(rows):
                result.published.extend(m.id for m in rows)
                continue
            if error is None:
                # A server that ignores batch headers stored them as plain messages,
                # unacknowledged: send them again one by one (their msg ids dedup).
                self._stop_atomic("the server acknowledged a batch as a single message")
            elif classify(error)[0] is Kind.TRANSIENT and not _overloaded(error):
                # (An overloaded server goes on below: a batch larger than it queues can
                # never pass whole; one by one, its answers pace what gets through.)
                for _ in rows:
                    result.add_transient(classify(error)[1])
                continue
            elif (
                isinstance(error, nats.js.errors.APIError)
                and error.err_code in atomic.BATCHING_REFUSED
            ):
                self._stop_atomic(classify(error)[1])
            refused.extend(rows)
        return refused

    async def _send_batch(
        self, batch: Sequence[_Prepared], result: BatchResult
    ) -> _BatchInFlight | list[OutboxMessage] | None:
        """Publish one atomic batch; its rows if sending failed for a row's reason, None
        (rows left as they are) for an outage. The server drops a batch left unfinished."""
        batch_id = uuid.uuid4().hex
        rows = [message for message, _ in batch]
        reply, future = self._acks.expect()
        last = len(batch)
        outgoing = [
            (
                message.subject,
                reply if number == last else "",
                atomic.batch_headers(headers, batch_id, number, commit=number == last),
                message.payload,
            )
            for number, (message, headers) in enumerate(batch, start=1)
        ]
        try:
            await self._writer.publish(outgoing)
        except Exception as exc:  # noqa: BLE001 - every failure is classified
            self._acks.forget(reply)
            kind, reason = classify(exc)
            if kind is not Kind.TRANSIENT:
                return rows
            for _ in rows:
                result.add_transient(reason)
            return None
        return rows, reply, future

    def _stop_atomic(self, reason: str) -> None:
        if self._atomic:
            self._atomic = False
            log.warning(
                "atomic batch publish off for stream %s (%s): one PubAck per message from now",
                self._stream,
                reason,
            )

    async def _after_send(self) -> None:
        if armed(AFTER_PUBLISH):
            await self._nc.flush()  # on the wire, so the crash lands after the send
            failpoint(AFTER_PUBLISH)

    async def _wait(self, futures: list[asyncio.Future[Ack]]) -> None:
        if futures:
            with anyio.move_on_after(self._timeout):
                await asyncio.wait(futures)

    async def _publish_one_by_one(
        self,
        messages: Sequence[OutboxMessage],
        result: BatchResult,
        send_until: float | None,
    ) -> None:
        """One PubAck per message, pipelined.

        Ordered: a key's rows go out one per wave, each only after the one before
        it was acknowledged, so a failed row holds back the rest of its key (keyless
        rows and different keys still share each wave).
        """
        if self._ordered:
            wave, later = waves(messages)
        else:
            wave, later = list(messages), {}
        while wave:
            if send_until is not None and time.monotonic() > send_until:
                break
            published = await self._publish_wave(wave, result)
            if result.transient:
                break  # an outage: the rest waits for the next claim
            wave = [
                later[m.ordering_key].popleft()
                for m in wave
                if m.ordering_key is not None and m.id in published and later.get(m.ordering_key)
            ]

    async def _publish_wave(self, wave: Sequence[OutboxMessage], result: BatchResult) -> set[int]:
        """Send ``wave``, wait for its PubAcks; return the ids now in the stream."""
        already = len(result.published)
        in_flight = await self._send(wave, result)
        await self._after_send()
        await self._wait([future for _, _, future in in_flight])
        await self._collect(in_flight, result)
        return set(result.published[already:])

    def _stream_binds(self, message: OutboxMessage) -> bool:
        if not self._subjects:
            return True  # not known: the server's answer tells
        subject = message.subject
        binds = self._in_stream.get(subject)
        if binds is None:
            if len(self._in_stream) > _SUBJECTS_REMEMBERED:
                self._in_stream.clear()
            binds = any(subject_matches(pattern, subject) for pattern in self._subjects)
            self._in_stream[subject] = binds
        return binds

    def _prepare(self, message: OutboxMessage, result: BatchResult) -> dict[str, str] | None:
        """The headers to send ``message`` with, or None with the row's failure recorded."""
        try:
            headers = message_headers(message, self._stream, ordered=self._ordered)
        except OutboxError as exc:
            result.failures.append(Failure(message.id, f"unpublishable row: {exc}"))
            return None
        max_payload = self._nc.max_payload
        if size := over_max_payload(headers, len(message.payload), max_payload):
            result.failures.append(
                Failure(
                    message.id,
                    f"message of {size} bytes (payload and headers) exceeds the "
                    f"server's max_payload of {max_payload} bytes",
                )
            )
            return None
        return headers

    async def _send(
        self, messages: Sequence[OutboxMessage], result: BatchResult
    ) -> list[_InFlight]:
        in_flight: list[_InFlight] = []
        for message in messages:
            headers = self._prepare(message, result)
            if headers is None:
                continue
            reply, future = self._acks.expect()
            try:
                await self._nc.publish(
                    message.subject, message.payload, reply=reply, headers=headers
                )
            except Exception as exc:  # noqa: BLE001 - every failure is classified
                self._acks.forget(reply)
                self._record_error(result, message, exc)
            else:
                in_flight.append((message, reply, future))
        return in_flight

    async def _collect(self, in_flight: list[_InFlight], result: BatchResult) -> None:
        unroutable = []
        for message, reply, future in in_flight:
            if not future.done():
                self._acks.forget(reply)
                result.add_transient(NO_PUBACK)
            elif (error := future.exception()) is not None:
                if classify(error)[0] is Kind.NO_STREAM:
                    unroutable.append(message)
                else:
                    self._record_error(result, message, error)
            else:
                result.published.append(message.id)
                result.duplicates += future.result().duplicate
        if unroutable:
            await self._sort_unroutable(result, unroutable)

    async def _sort_unroutable(self, result: BatchResult, messages: list[OutboxMessage]) -> None:
        # "No responders" means no stream binds the subject: the row's fault, unless our
        # own stream is missing (deleted, or the server lost it), which is the servers'.
        try:
            await self._js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            stream_exists = False
        except Exception as exc:  # noqa: BLE001 - cannot tell: do not blame the rows
            for _ in messages:
                result.add_transient(f"cannot look up stream {self._stream}: {exc}")
            return
        else:
            stream_exists = True
        for message in messages:
            if stream_exists:
                result.failures.append(
                    Failure(message.id, f"no stream binds subject {message.subject}")
                )
            else:
                result.add_transient(f"stream {self._stream} does not exist")

    @staticmethod
    def _record_error(result: BatchResult, message: OutboxMessage, exc: BaseException) -> None:
        kind, reason = classify(exc)
        if kind is Kind.ROW:
            result.failures.append(Failure(message.id, reason))
        else:
            result.add_transient(reason)
