"""Publish a claimed batch to JetStream: one interface, three paths.

:class:`Publisher` hands a batch to the paths in one fixed order, each taking what it
can and handing the rest on: fast-ingest batches (:mod:`~outbox_relay.publish_fast`,
nats-server 2.14), atomic batches (:mod:`~outbox_relay.publish_atomic`, 2.12.1), then
one PubAck per message (:mod:`~outbox_relay.publish_single`), which takes every row.
A path is on when the server and the stream take its kind of batch, and switches
itself off for good when the server shows it does not. What the answers mean is pure
(:mod:`~outbox_relay.outcomes`); what the paths share is :mod:`~outbox_relay.channel`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from outbox_relay.channel import Channel, FrameWriter, message_headers
from outbox_relay.headers import (
    EXPECTED_STREAM_HEADER,
    MSG_ID_HEADER,
    ORDERING_KEY_HEADER,
    SEQUENCE_HEADER,
    wire_size,
)
from outbox_relay.jetstream import reset_connection
from outbox_relay.outcomes import (
    NO_FLOW_ACK,
    NO_PUBACK,
    Ack,
    BatchResult,
    Kind,
    classify,
    parse_ack,
)
from outbox_relay.publish_atomic import AtomicPath
from outbox_relay.publish_fast import FastIngestPath
from outbox_relay.publish_single import OneByOnePath, waves
from outbox_relay.store import OutboxMessage

log = logging.getLogger(__name__)

__all__ = [
    "EXPECTED_STREAM_HEADER",
    "MSG_ID_HEADER",
    "NO_FLOW_ACK",
    "NO_PUBACK",
    "ORDERING_KEY_HEADER",
    "SEQUENCE_HEADER",
    "Ack",
    "BatchResult",
    "FrameWriter",
    "Kind",
    "Publisher",
    "classify",
    "message_headers",
    "parse_ack",
    "waves",
    "wire_size",
]


class Publisher:
    """Publishes batches to one stream over one NATS connection.

    ``fast`` / ``atomic``: the server and the stream take fast-ingest / atomic batches;
    otherwise, and for rows those paths hand on, one PubAck per message.
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
        self._channel = Channel(nc, js, stream, timeout, ordered=ordered, subjects=subjects)
        self._fast = FastIngestPath(self._channel, on=fast)
        self._atomic = AtomicPath(self._channel, on=atomic)
        # The order a batch goes through them: the fall-back is this list.
        self._paths = (self._fast, self._atomic, OneByOnePath(self._channel))

    async def start(self) -> None:
        await self._channel.start()
        for path in self._paths:
            await path.start()

    @property
    def atomic(self) -> bool:
        return self._atomic.on

    @property
    def fast(self) -> bool:
        return self._fast.on

    @property
    def client(self) -> NATS:
        return self._channel.nc

    @property
    def connected(self) -> bool:
        return bool(self._channel.nc.is_connected)

    @property
    def closed(self) -> bool:
        """The client stopped for good (it does not reconnect from here)."""
        return bool(self._channel.nc.is_closed)

    async def close(self) -> None:
        await self._channel.nc.close()

    async def stream_exists(self) -> bool:
        """Whether the stream is there (False too when JetStream does not answer)."""
        channel = self._channel
        try:
            # nats-py's own timeout does not cover a write stuck on a silent link.
            with anyio.fail_after(channel.timeout):
                await channel.js.stream_info(channel.stream)
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    async def publish_batch(
        self,
        messages: Sequence[OutboxMessage],
        *,
        send_until: float | None = None,
    ) -> BatchResult:
        """Publish a claimed batch, each path taking what it can of the rows the one
        before handed on, until none are left or the servers fail (an outage).

        ``send_until`` (monotonic time) fences a relay whose claim may have lapsed:
        nothing starts after it, and the rows not sent stay in the outbox.
        """
        result = BatchResult()
        rest = messages
        for path in self._paths:
            if not rest or result.transient:
                break
            if path.on:
                rest = await path.publish(rest, result, send_until)
        if result.unanswered:
            self._reset_link()
        return result

    def _reset_link(self) -> None:
        """Drop the connection with a reset, so that no frame written on it and not yet
        delivered (a stalled link keeps them in the kernel's send queue, a blocked
        flush in nats-py's) can reach the server after the rows are given back and
        published again, perhaps by another relay: late, out of order, past the
        duplicate window. nats-py reconnects."""
        if reset_connection(self._channel.nc):
            log.warning(
                "publish unanswered: connection to NATS reset, nothing sent on it can arrive"
            )
        else:
            log.warning(
                "publish unanswered: a WebSocket connection cannot be reset; frames it "
                "still holds may arrive late"
            )
