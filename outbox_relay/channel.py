"""What every publish path shares: one NATS connection to one stream, the PubAck
inbox, the frame writer, and the headers each row goes out with."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from outbox_relay import frames
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
)
from outbox_relay.outcomes import STATUS_HEADER, Ack, BatchResult, parse_ack
from outbox_relay.store import Failure, OutboxMessage
from outbox_relay.subjects import subject_matches, validate_subject

_SUBJECTS_REMEMBERED = 10_000  # distinct subjects (event types): a few, usually
# What one publish sends: subject, reply subject, headers, payload.
Outgoing = tuple[str, str, dict[str, str], bytes]
# A row ready to send, with its headers.
Prepared = tuple[OutboxMessage, dict[str, str]]
# nats-py's write buffer, which FrameWriter hands its frames to.
_CLIENT_INTERNALS = (
    "_send_command",
    "_flush_pending",
    "_flush_queue",
    "_pending_data_size",
    "_max_pending_size",
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

    async def publish(self, messages: Sequence[Outgoing]) -> None:
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


class Channel:
    """One connection to one stream, as the publish paths use it."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        timeout: float,
        *,
        ordered: bool,
        subjects: Sequence[str] = (),
    ) -> None:
        self.nc = nc
        self.js = js
        self.stream = stream
        self.timeout = timeout
        self.ordered = ordered
        # The stream's subjects, where known: a fast batch must not send a row the
        # stream cannot store (another stream would answer it, outside the batch).
        self._subjects = tuple(subjects)
        self._in_stream: dict[str, bool] = {}
        self.acks = AckInbox(nc)
        self.writer = FrameWriter(nc)

    async def start(self) -> None:
        await self.acks.start()

    def prepare(self, message: OutboxMessage, result: BatchResult) -> dict[str, str] | None:
        """The headers to send ``message`` with, or None with the row's failure recorded."""
        try:
            headers = message_headers(message, self.stream, ordered=self.ordered)
        except OutboxError as exc:
            result.failures.append(Failure(message.id, f"unpublishable row: {exc}"))
            return None
        max_payload = self.nc.max_payload
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

    def prepare_all(
        self,
        messages: Sequence[OutboxMessage],
        result: BatchResult,
        *,
        outside: list[OutboxMessage] | None = None,
    ) -> list[Prepared]:
        """The rows that can be sent, with their headers; ordered, a row that cannot
        holds back the later rows of its key (left in the outbox, as a wave would).
        ``outside`` collects, instead, the rows whose subject the stream does not bind
        (they hold back their key likewise)."""
        prepared: list[Prepared] = []
        held: set[str] = set()
        for message in messages:
            key = message.ordering_key if self.ordered else None
            if key is not None and key in held:
                continue
            headers = self.prepare(message, result)
            if headers is not None and outside is not None and not self._stream_binds(message):
                outside.append(message)
                headers = None
            if headers is not None:
                prepared.append((message, headers))
            elif key is not None:
                held.add(key)
        return prepared

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

    async def after_send(self) -> None:
        if armed(AFTER_PUBLISH):
            await self.nc.flush()  # on the wire, so the crash lands after the send
            failpoint(AFTER_PUBLISH)

    async def wait(self, futures: list[asyncio.Future[Ack]]) -> None:
        """Until every future is done or the publish timeout passes."""
        if futures:
            with anyio.move_on_after(self.timeout):
                await asyncio.wait(futures)
