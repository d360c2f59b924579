"""The fast-ingest path (nats-server 2.14): a claim's rows as flow-controlled batches.

Protocol rules are in :mod:`outbox_relay.fast_ingest`; this is the I/O.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from outbox_relay import fast_ingest
from outbox_relay.channel import Channel, Prepared
from outbox_relay.outcomes import NO_FLOW_ACK, NO_PUBACK, BatchResult, Kind, classify
from outbox_relay.store import OutboxMessage

log = logging.getLogger(__name__)


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


class FastIngestPath:
    """Sends rows as fast-ingest batches; switches itself off if the stream refuses
    batching, and hands every row it cannot place to the next path."""

    def __init__(self, channel: Channel, *, on: bool) -> None:
        self._channel = channel
        self._inbox = FastInbox(channel.nc)
        self.on = on

    async def start(self) -> None:
        await self._inbox.start()

    async def publish(
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
        prepared: Sequence[Prepared] = self._channel.prepare_all(messages, result, outside=outside)
        while prepared:
            if send_until is not None and time.monotonic() > send_until:
                return []  # the rows not sent stay in the outbox
            prepared, next_path = await self._batch(prepared, result)
            if next_path:
                break
        if outside and self._channel.ordered and result.failures:
            # A key whose row failed in a batch holds back its later rows, these too.
            failed = {failure.id for failure in result.failures}
            held = {m.ordering_key for m in messages if m.id in failed}
            outside = [m for m in outside if m.ordering_key not in held]
        return [*(message for message, _ in prepared), *outside]

    async def _batch(
        self, prepared: Sequence[Prepared], result: BatchResult
    ) -> tuple[Sequence[Prepared], bool]:
        """One fast-ingest batch: the rows still to send, and whether they are for the
        next path (True) or for another fast batch."""
        batch_id, prefix, batch = self._inbox.open(min(len(prepared), fast_ingest.MAX_FLOW))
        try:
            sent = await self._send(prepared, prefix, batch, result)
            if sent:
                await self._channel.after_send()
                await self._until(batch, fast_ingest.refused)
                if batch.refused is not None and not batch.ended:
                    # Refused before it joined the batch, the last message sent: the
                    # server answers the batch only once it sees a message after it.
                    await self._close(prefix, sent + 1, prepared[0][0].subject)
                    await self._until(batch)
        finally:
            self._inbox.close(batch_id)
        if result.transient:
            return [], False
        if not sent:
            return prepared, True
        return self._outcome(batch, prepared, result)

    async def _close(self, prefix: str, sequence: int, subject: str) -> None:
        with contextlib.suppress(nats.errors.Error):  # then the PubAck's wait times out
            await self._channel.nc.publish(
                subject,
                b"",
                reply=fast_ingest.reply_subject(prefix, sequence, fast_ingest.Operation.CLOSE),
            )

    def _outcome(
        self, batch: fast_ingest.BatchState, prepared: Sequence[Prepared], result: BatchResult
    ) -> tuple[Sequence[Prepared], bool]:
        """What the server's answers to a batch sent whole mean for its rows."""
        if batch.stored is None:
            if batch.error is None:
                for _ in prepared:
                    result.add_transient(NO_PUBACK)
                return [], False
            if batch.error.err_code in fast_ingest.BATCHING_REFUSED:
                self._switch_off(classify(batch.error)[1])
            return prepared, True  # anything already stored deduplicates there
        stored = min(batch.stored, len(prepared))
        result.published.extend(message.id for message, _ in prepared[:stored])
        rest = prepared[stored:]
        refused = batch.refused
        if refused is None or refused.error is None or refused.sequence != stored + 1:
            # A gap, or an answer we cannot place: the next path sorts the rest out.
            return rest, True
        failed = rest[0][0]
        result.record_error(failed, refused.error)
        if result.transient:
            return [], False
        rest = rest[1:]
        if self._channel.ordered and failed.ordering_key is not None:
            rest = [(m, h) for m, h in rest if m.ordering_key != failed.ordering_key]
        return rest, False

    async def _send(
        self,
        prepared: Sequence[Prepared],
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
                await self._channel.writer.publish(outgoing)
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
        with anyio.move_on_after(self._channel.timeout):
            while not (batch.ended or (done and done(batch))):
                batch.changed.clear()
                await batch.changed.wait()
            return True
        return False

    def _switch_off(self, reason: str) -> None:
        if self.on:
            self.on = False
            log.warning(
                "fast-ingest batch publish off for stream %s (%s)", self._channel.stream, reason
            )
