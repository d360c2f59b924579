"""The atomic-batch path (nats-server 2.12.1): a claim's rows in batches stored whole.

Protocol rules are in :mod:`outbox_relay.atomic`; this is the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

import nats.js.errors

from outbox_relay import atomic
from outbox_relay.channel import Channel, Prepared
from outbox_relay.headers import wire_size
from outbox_relay.outcomes import NO_PUBACK, Ack, BatchResult, Kind, classify, overloaded
from outbox_relay.store import OutboxMessage

log = logging.getLogger(__name__)

# An atomic batch awaiting its PubAck: its rows, the commit's reply subject, the future.
_BatchInFlight = tuple[list[OutboxMessage], str, asyncio.Future[Ack]]


class AtomicPath:
    """Sends rows as atomic batches; switches itself off if the server does not take
    them, and hands the rows of a batch refused whole to the next path."""

    def __init__(self, channel: Channel, *, on: bool) -> None:
        self._channel = channel
        self.on = on

    async def start(self) -> None:
        """Nothing to set up: PubAcks arrive on the channel's inbox."""

    async def publish(
        self, messages: Sequence[OutboxMessage], result: BatchResult, send_until: float | None
    ) -> Sequence[OutboxMessage]:
        """Send ``messages`` as atomic batches; return the rows to send one by one.

        Each batch is stored whole and in order, so every key's rows keep their order
        within it. A batch refused whole (a msg id already stored after a crash, one bad
        row) goes one by one, which isolates the bad row. Ordered, batches go one after
        the other and the first refused sends the rest one by one too, so no key's later
        rows are stored before its earlier ones.
        """
        channel = self._channel
        prepared = channel.prepare_all(messages, result)
        max_payload = channel.nc.max_payload
        if any(
            wire_size(headers, len(message.payload)) + atomic.BATCH_HEADER_BYTES > max_payload
            for message, headers in prepared
        ):
            # Fits alone but not with the batch headers: rare enough to send all singly.
            return [message for message, _ in prepared]
        batches = atomic.split(prepared)
        if not channel.ordered:
            return await self._commit(batches, result, send_until)
        for index, batch in enumerate(batches):
            refused = await self._commit([batch], result, send_until)
            if result.transient:
                return []
            if refused:
                return [*refused, *(m for later in batches[index + 1 :] for m, _ in later)]
        return []

    async def _commit(
        self,
        batches: Sequence[Sequence[Prepared]],
        result: BatchResult,
        send_until: float | None,
    ) -> list[OutboxMessage]:
        """Send ``batches``, wait for their PubAcks; return the rows of those refused."""
        channel = self._channel
        in_flight: list[_BatchInFlight] = []
        refused: list[OutboxMessage] = []
        for batch in batches:
            if send_until is not None and time.monotonic() > send_until:
                break
            sent = await self._send(batch, result)
            if isinstance(sent, list):
                refused.extend(sent)
            elif sent is not None:
                in_flight.append(sent)
        await channel.after_send()
        await channel.wait([future for _, _, future in in_flight])
        for rows, reply, future in in_flight:
            if not future.done():
                channel.acks.forget(reply)
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
                self._switch_off("the server acknowledged a batch as a single message")
            elif classify(error)[0] is Kind.TRANSIENT and not overloaded(error):
                # (An overloaded server goes on below: a batch larger than it queues can
                # never pass whole; one by one, its answers pace what gets through.)
                for _ in rows:
                    result.add_transient(classify(error)[1])
                continue
            elif (
                isinstance(error, nats.js.errors.APIError)
                and error.err_code in atomic.BATCHING_REFUSED
            ):
                self._switch_off(classify(error)[1])
            refused.extend(rows)
        return refused

    async def _send(
        self, batch: Sequence[Prepared], result: BatchResult
    ) -> _BatchInFlight | list[OutboxMessage] | None:
        """Publish one atomic batch; its rows if sending failed for a row's reason, None
        (rows left as they are) for an outage. The server drops a batch left unfinished."""
        acks = self._channel.acks
        batch_id = uuid.uuid4().hex
        rows = [message for message, _ in batch]
        reply, future = acks.expect()
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
            await self._channel.writer.publish(outgoing)
        except Exception as exc:  # noqa: BLE001 - every failure is classified
            acks.forget(reply)
            kind, reason = classify(exc)
            if kind is not Kind.TRANSIENT:
                return rows
            for _ in rows:
                result.add_transient(reason)
            return None
        return rows, reply, future

    def _switch_off(self, reason: str) -> None:
        if self.on:
            self.on = False
            log.warning(
                "atomic batch publish off for stream %s (%s): one PubAck per message from now",
                self._channel.stream,
                reason,
            )
