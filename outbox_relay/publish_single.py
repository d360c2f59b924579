"""The path every server takes: one PubAck per message, pipelined in waves."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

import nats.js.errors

from outbox_relay.channel import Channel
from outbox_relay.outcomes import NO_PUBACK, Ack, BatchResult, Kind, classify
from outbox_relay.store import Failure, OutboxMessage

_InFlight = tuple[OutboxMessage, str, asyncio.Future[Ack]]


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


class OneByOnePath:
    """One PubAck per message: the last path, which takes every row it is given."""

    on = True

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def start(self) -> None:
        """Nothing to set up: PubAcks arrive on the channel's inbox."""

    async def publish(
        self, messages: Sequence[OutboxMessage], result: BatchResult, send_until: float | None
    ) -> Sequence[OutboxMessage]:
        """One PubAck per message, pipelined; no row is left for another path.

        Ordered: a key's rows go out one per wave, each only after the one before
        it was acknowledged, so a failed row holds back the rest of its key (keyless
        rows and different keys still share each wave).
        """
        if self._channel.ordered:
            wave, later = waves(messages)
        else:
            wave, later = list(messages), {}
        while wave:
            if send_until is not None and time.monotonic() > send_until:
                break
            published = await self._wave(wave, result)
            if result.transient:
                break  # an outage: the rest waits for the next claim
            wave = [
                later[m.ordering_key].popleft()
                for m in wave
                if m.ordering_key is not None and m.id in published and later.get(m.ordering_key)
            ]
        return []

    async def _wave(self, wave: Sequence[OutboxMessage], result: BatchResult) -> set[int]:
        """Send ``wave``, wait for its PubAcks; return the ids now in the stream."""
        already = len(result.published)
        in_flight = await self._send(wave, result)
        await self._channel.after_send()
        await self._channel.wait([future for _, _, future in in_flight])
        await self._collect(in_flight, result)
        return set(result.published[already:])

    async def _send(
        self, messages: Sequence[OutboxMessage], result: BatchResult
    ) -> list[_InFlight]:
        channel = self._channel
        in_flight: list[_InFlight] = []
        for message in messages:
            headers = channel.prepare(message, result)
            if headers is None:
                continue
            reply, future = channel.acks.expect()
            try:
                await channel.nc.publish(
                    message.subject, message.payload, reply=reply, headers=headers
                )
            except Exception as exc:  # noqa: BLE001 - every failure is classified
                channel.acks.forget(reply)
                result.record_error(message, exc)
            else:
                in_flight.append((message, reply, future))
        return in_flight

    async def _collect(self, in_flight: list[_InFlight], result: BatchResult) -> None:
        unroutable = []
        for message, reply, future in in_flight:
            if not future.done():
                self._channel.acks.forget(reply)
                result.add_transient(NO_PUBACK)
            elif (error := future.exception()) is not None:
                if classify(error)[0] is Kind.NO_STREAM:
                    unroutable.append(message)
                else:
                    result.record_error(message, error)
            else:
                result.published.append(message.id)
                result.duplicates += future.result().duplicate
        if unroutable:
            await self._sort_unroutable(result, unroutable)

    async def _sort_unroutable(self, result: BatchResult, messages: list[OutboxMessage]) -> None:
        # "No responders" means no stream binds the subject: the row's fault, unless our
        # own stream is missing (deleted, or the server lost it), which is the servers'.
        stream = self._channel.stream
        try:
            await self._channel.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            stream_exists = False
        except Exception as exc:  # noqa: BLE001 - cannot tell: do not blame the rows
            for _ in messages:
                result.add_transient(f"cannot look up stream {stream}: {exc}")
            return
        else:
            stream_exists = True
        for message in messages:
            if stream_exists:
                result.failures.append(
                    Failure(message.id, f"no stream binds subject {message.subject}")
                )
            else:
                result.stream_missing = True
                result.add_transient(f"stream {stream} does not exist")
