"""The batch pipeline: claim, publish, finish (delete and commit), failures.

One transaction per batch: the claim's row locks are held while the batch is
published and are released by the commit that deletes the published rows. A relay
that dies mid-batch therefore leaves its rows to the others, and a re-publish is
collapsed by JetStream's duplicate window (the ``Nats-Msg-Id`` is the event id).

Two sessions take turns, so that PostgreSQL's work and NATS's overlap: while one
batch waits for its PubAcks, the batch before it is deleted and committed and the
next one is claimed on the other session (:meth:`Pipeline.step`). Batches are still
published one after the other, in the order they were claimed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg

from outbox_relay.config import Settings
from outbox_relay.errors import ServerUnavailableError
from outbox_relay.failpoints import AFTER_ACK, AFTER_CLAIM, failpoint
from outbox_relay.metrics import RelayMetrics, RelayState, RelayStats
from outbox_relay.outages import STATEMENT_TIMEOUT
from outbox_relay.publish import BatchResult, Publisher
from outbox_relay.sessions import Sessions
from outbox_relay.store import (
    UNORDERED,
    ClaimScope,
    OutboxLayout,
    OutboxMessage,
    OutboxStore,
)

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Batch:
    """A claimed batch: its rows stay locked until its session's transaction ends."""

    conn: psycopg.AsyncConnection[Any]
    messages: list[OutboxMessage]
    send_until: float  # monotonic: no publish starts after it
    # Reached the byte budget: rows of it may be locked but not returned, which a
    # claim meanwhile would skip, taking their keys' later rows.
    locks_more: bool = False
    result: BatchResult = field(default_factory=BatchResult)

    @property
    def size(self) -> int:
        return len(self.messages)

    def unsettled_keys(self) -> frozenset[str]:
        """The keys of rows not stored: a batch claimed meanwhile may hold later rows
        of theirs, which must not go out first."""
        stored = set(self.result.published)
        return frozenset(
            m.ordering_key
            for m in self.messages
            if m.ordering_key is not None and m.id not in stored
        )


@dataclass(frozen=True, slots=True)
class Step:
    claimed: int  # rows claimed this turn
    published: int = 0  # rows of the batch published this turn
    result: BatchResult | None = None  # and what became of them


class Pipeline:
    """Batches in flight on the relay's two sessions, one :meth:`step` at a time."""

    def __init__(
        self,
        settings: Settings,
        layout: OutboxLayout,
        store: OutboxStore,
        sessions: Sessions,
        *,
        metrics: RelayMetrics,
        stats: RelayStats,
        stopping: anyio.Event,
    ) -> None:
        self.settings = settings
        self._layout = layout  # the rows
        self._store = store  # what else the claim's session is asked
        self._sessions = sessions
        self._partitions = sessions.partitions
        self._metrics = metrics
        self._stats = stats
        self._stopping = stopping
        # The batches in flight: claimed (to publish next turn) and published (to
        # delete and commit next turn).
        self._claimed: Batch | None = None
        self._published: Batch | None = None
        # Payload bytes per row of the last batch: a claim locks about as many rows as
        # the byte budget lets it return, since rows locked past the budget hold their
        # keys back from the next claim until this one ends.
        self._bytes_per_row = 0.0

    @property
    def in_flight(self) -> bool:
        return self._claimed is not None or self._published is not None

    def drop(self) -> None:
        """The sessions are closed: their batches' rows went back with them."""
        self._claimed = self._published = None

    async def step(
        self, publisher: Publisher, alongside: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> Step:
        """One turn of the pipeline: publish the batch claimed last turn while, on the
        other session, the batch published last turn is finished and the next claimed.

        A claim overlaps a publish only when nothing can go out of order: in ordered
        mode a batch claimed during the publish of the one before holds back the keys
        that batch did not get stored (their later rows may be in it), and while it
        holds any, or partitions are to be given back, or the batch published holds
        rows locked past the byte budget, the next claim waits until nothing is in
        flight. ``alongside`` runs beside the publish too, before the finish and the
        claim: statements of one session must not interleave their transactions.
        """
        ordered = self.settings.ordered
        ready, finishing = self._claimed, self._published
        self._claimed = self._published = None
        held: frozenset[str] = frozenset()
        if ready is not None and finishing is not None and ordered:
            held = finishing.unsettled_keys()
        claim = not self._stopping.is_set() and (
            ready is None
            or not (held or self._partitions.must_settle or (ordered and ready.locks_more))
        )
        claimed: Batch | None = None
        main = self._sessions.first()

        async def publish() -> None:
            if ready is not None:
                await self._publish(ready, publisher, held)

        async def finish_then_claim() -> None:
            nonlocal claimed
            if alongside is not None:
                await alongside()
            if finishing is not None:
                await self._finish(finishing)
            if claim:
                # The session not publishing; the main one when nothing is in flight.
                if ready is None:
                    claimed = await self._claim(main, settled=True)
                elif ready.conn is main:
                    claimed = await self._claim(self._sessions.other())
                else:
                    claimed = await self._claim(main)

        try:
            await _concurrently(publish, finish_then_claim)
        except BaseException:
            # Their sessions are closed (or the relay stops on a bug): rows go back.
            self.drop()
            raise
        self._claimed = claimed
        if ready is None:
            return Step(claimed.size if claimed else 0)
        result = ready.result
        if result.transient:
            # An outage: the claim behind it waits with everything else.
            self._claimed = None
            await self._finish(ready)
            if claimed is not None:
                await claimed.conn.rollback()
            # Rows wait: not a reason to go idle (that is for an empty outbox).
            return Step(ready.size, ready.size, result)
        self._published = ready
        return Step(claimed.size if claimed else 0, ready.size, result)

    async def settle(self) -> None:
        """Finish the batch published and give back the one claimed (stop, outage)."""
        claimed, published = self._claimed, self._published
        self.drop()
        if published is not None:
            await self._finish(published)
        if claimed is not None:
            await claimed.conn.rollback()

    async def settle_if_possible(self) -> None:
        """:meth:`settle`; if PostgreSQL is unreachable, the sessions' rows go back
        with them (the published ones are published again, and deduplicated)."""
        try:
            with anyio.fail_after(STATEMENT_TIMEOUT):
                await self.settle()
        except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
            if not self._sessions.lost(exc):
                raise
            self.drop()
            await self._sessions.close()

    async def _claim(
        self, conn: psycopg.AsyncConnection[Any], *, settled: bool = False
    ) -> Batch | None:
        """Claim a batch in a transaction of ``conn``, left open; None if nothing is due.

        ``settled``: no other batch is in flight, so partitions may be given back.
        """
        conn = self._sessions.usable(conn)
        settings = self.settings
        scope = UNORDERED
        if settings.ordered:
            main = self._sessions.first()
            if conn is main:  # the session holding the partitions, free now
                await self._partitions.rebalance(conn, settled=settled)
            scope = ClaimScope(
                ordered=True,
                partitions=self._partitions.claimable,
                hold_behind_dead_letters=settings.dead_letter_policy == "hold",
                # The main session holds the partitions; it may be gone (frozen relay).
                owner_pid=None if conn is main else main.info.backend_pid,
            )
        limit = settings.batch_size
        if self._bytes_per_row:
            limit = max(1, min(limit, int(settings.batch_max_bytes / self._bytes_per_row)))
        messages = await self._layout.claim(conn, limit, scope, max_bytes=settings.batch_max_bytes)
        # Past this no wave starts: the claim's locks may be gone by then.
        send_until = time.monotonic() + settings.publish_timeout
        if not messages:
            await conn.rollback()
            return None
        payload_bytes = sum(len(m.payload) for m in messages)
        self._bytes_per_row = payload_bytes / len(messages)
        self._metrics.set_state(RelayState.BUSY)
        self._metrics.batch_rows.observe(len(messages))
        failpoint(AFTER_CLAIM)
        # Rows past the byte budget stay locked: only in a batch that reached it with
        # fewer rows than it locked at most.
        locks_more = payload_bytes >= settings.batch_max_bytes and len(messages) < limit
        return Batch(conn, messages, send_until, locks_more)

    async def _publish(self, batch: Batch, publisher: Publisher, held: frozenset[str]) -> None:
        """Publish ``batch`` but for the rows of ``held`` keys, which stay in the outbox."""
        if self.settings.standby_confirmed and not await self._store.standby_has_claim(
            batch.conn, batch.send_until
        ):
            # Unconfirmed rows wait, as in an outage: nothing is sent or marked.
            batch.result = BatchResult()
            for _ in batch.messages:
                batch.result.add_transient("no standby has flushed them yet")
            return
        messages = [m for m in batch.messages if m.ordering_key not in held]
        with self._metrics.publish_seconds.time():
            batch.result = await publisher.publish_batch(messages, send_until=batch.send_until)

    async def _finish(self, batch: Batch) -> None:
        """Delete the rows published, record the failures, commit: the claim ends."""
        result, conn = batch.result, batch.conn
        outcome = await self._layout.finish(conn, result.published, result.failures)
        failpoint(AFTER_ACK)
        await conn.commit()
        stats = self._stats
        stats.batches += 1
        stats.published += len(result.published)
        stats.duplicates += result.duplicates
        stats.retried += outcome.retried
        stats.dead_lettered += outcome.dead_lettered
        number = stats.batches
        for failure in result.failures:
            log.warning(
                "outbox row %d failed: %s",
                failure.id,
                failure.reason,
                extra={"batch": number, "outbox_id": failure.id},
            )
        if outcome.dead_lettered:
            log.error(
                "%d rows moved to the dead letters, their attempts at the limit of %d "
                "(--max-attempts)",
                outcome.dead_lettered,
                self.settings.max_attempts,
                extra={"batch": number, "dead_lettered": outcome.dead_lettered},
            )
        if not log.isEnabledFor(logging.DEBUG):
            return
        log.debug(
            "batch %d: claimed %d, published %d (%d duplicates), failed %d, left %d",
            number,
            batch.size,
            len(result.published),
            result.duplicates,
            len(result.failures),
            result.transient,
            extra={
                "batch": number,
                "claimed": batch.size,
                "published": len(result.published),
                "duplicates": result.duplicates,
                "failed": len(result.failures),
                "left": result.transient,
            },
        )


async def _concurrently(*functions: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``functions`` together; an error comes out as itself, not in a group."""
    try:
        async with anyio.create_task_group() as tg:
            for function in functions:
                tg.start_soon(function)
    except BaseExceptionGroup as group:
        cancelled = anyio.get_cancelled_exc_class()
        errors = [e for e in _leaves(group) if not isinstance(e, cancelled)]
        if errors:
            raise errors[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]
