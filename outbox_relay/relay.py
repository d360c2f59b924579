"""The relay loop: wake, claim, publish, acknowledge, repeat.

One transaction per batch: the claim's row locks are held while the batch is
published and are released by the commit that deletes the published rows. A relay
that dies mid-batch therefore leaves its rows to the others, and a re-publish is
collapsed by JetStream's duplicate window (the ``Nats-Msg-Id`` is the event id).

Two sessions take turns, so that PostgreSQL's work and NATS's overlap: while one
batch waits for its PubAcks, the batch before it is deleted and committed and the
next one is claimed on the other session (:meth:`Relay._step`). Batches are still
published one after the other, in the order they were claimed.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg

from outbox_relay.config import Settings, format_duration, redact_url
from outbox_relay.database import connect_postgres, connected_to
from outbox_relay.errors import ReadOnlyServerError, ServerUnavailableError
from outbox_relay.failpoints import AFTER_ACK, AFTER_CLAIM, failpoint
from outbox_relay.jetstream import (
    batch_support,
    connect_nats,
    ensure_stream,
    publish_note,
    stream_batches,
)
from outbox_relay.logs import relay_id_context
from outbox_relay.metrics import RelayMetrics, RelayState
from outbox_relay.partitions import PartitionOwner
from outbox_relay.publish import BatchResult, Publisher
from outbox_relay.queries import query
from outbox_relay.schema import ensure_migrated
from outbox_relay.store import UNORDERED, ClaimScope, OutboxMessage, OutboxStore, RetryPolicy

log = logging.getLogger(__name__)

_STATEMENT_TIMEOUT = 30.0
# How long the listener waits for a notification before it checks its connection.
_LISTEN_PROBE_INTERVAL = 30.0
_IDLE_SESSION_TIMEOUT_SINCE = 140000  # PostgreSQL 14
# Longest an idle relay sleeps in ordered mode, between looks at the partitions.
_REBALANCE_SLEEP = 2.0
# How soon a relay below its share of partitions looks again.
_SHORT_RECHECK = 0.1
# A relay that has not been able to publish for this long gives its key partitions
# back, so that the other relays deliver its keys (README: Guarantees).
STEP_DOWN_AFTER = 2.0
# How often a relay waiting out a NATS outage looks whether the client reconnected.
_RECONNECT_POLL = 0.1
# How often a relay that stepped down checks whether it can publish again.
_REJOIN_CHECK = 1.0


class _Idle(enum.Enum):
    BUSY = "busy"
    ANNOUNCED = "announced"  # wake-ups assured; one more poll, then sleep
    SLEPT = "slept"


@dataclass(slots=True)
class RelayStats:
    batches: int = 0
    published: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0


class Wakeup:
    """A resettable event: set by notifications and reconnects, cleared before a claim.

    Clearing *before* claiming means a notification that lands during the claim is
    kept for the next round, so no wake-up is lost.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self, at_most: float) -> None:
        with anyio.move_on_after(at_most):
            await self._event.wait()


class Backoff:
    """Exponential backoff with full jitter, for outages."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * 2.0 ** min(self._attempt, 30))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


@dataclass(slots=True, eq=False)
class _Batch:
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
class _Step:
    claimed: int  # rows claimed this turn
    published: int = 0  # rows of the batch published this turn
    result: BatchResult | None = None  # and what became of them


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


def default_relay_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Relay:
    """Moves committed outbox rows to JetStream until told to stop."""

    def __init__(self, settings: Settings, *, relay_id: str | None = None) -> None:
        self.settings = settings
        self.relay_id = relay_id or default_relay_id()
        self.stats = RelayStats()
        self.metrics = RelayMetrics(
            self.stats, relay_id=self.relay_id, stream=settings.stream, schema=settings.schema
        )
        self._connections = self.metrics.connections
        self._store = OutboxStore(
            settings.names,
            RetryPolicy(settings.max_attempts, settings.retry_backoff, settings.retry_backoff_max),
        )
        self._wakeup = Wakeup()
        self._partitions = PartitionOwner(self._store, self.relay_id)
        self.metrics.partitions_owned.set_function(lambda: len(self._partitions.owned))
        # Set when producers in flight keep the relay from sleeping: _wait_for_producers
        # wakes the relay once they have committed.
        self._producers_in_flight = Wakeup()
        # Since when publishing has failed (None: it works), and whether this relay
        # has given its partitions back because of it.
        self._unpublishable_since: float | None = None
        self._stepped_down = False
        self._next_rejoin_check = 0.0
        self._idle = _Idle.BUSY
        self._holds_idle_lock = False
        self._stopping = anyio.Event()
        self._started = anyio.Event()
        self._reopen_error = ""  # why the session could not be reopened, for the log
        # The second session of the pipeline, and the batches in flight: claimed (to
        # publish next turn) and published (to delete and commit next turn).
        self._spare: psycopg.AsyncConnection[Any] | None = None
        self._claimed: _Batch | None = None
        self._published: _Batch | None = None
        # Payload bytes per row of the last batch: a claim locks about as many rows as
        # the byte budget lets it return, since rows locked past the budget hold their
        # keys back from the next claim until this one ends.
        self._bytes_per_row = 0.0
        # Shown in pg_stat_activity, so an operator can tell which relay holds what.
        self._application_name = f"outbox-relay {self.relay_id}"[:63]

    def stop(self) -> None:
        """Stop claiming; the batch in flight is finished first. Safe from a signal task."""
        self._stopping.set()
        self._connections.stopping = True
        self.metrics.set_state(RelayState.STOPPING)
        self._wakeup.set()

    async def wait_started(self) -> None:
        """Return once the relay is connected, checked and listening."""
        await self._started.wait()

    async def run(self) -> None:
        """Check the servers, then relay until :meth:`stop`.

        Start-up problems raise :class:`~outbox_relay.errors.OutboxError`; once running,
        outages are logged and waited out.
        """
        settings = self.settings
        relay_id_context.set(self.relay_id)
        conn = await self._writable_session()
        if conn is None:
            return  # stopped while waiting for a primary
        self._conn = conn
        self._publisher: Publisher | None = None
        try:
            await ensure_migrated(self._conn, settings.names)
            self._spare = await self._open_spare()
            self._publisher = await self._connect_publisher()
            async with anyio.create_task_group() as tg:
                await tg.start(self._listen)
                tg.start_soon(self._watch)
                tg.start_soon(self._wait_for_producers)
                log.info(
                    "relay %s started: database %s, schema %s, NATS %s, stream %s, "
                    "batch size %d, poll interval %s",
                    self.relay_id,
                    connected_to(self._conn),
                    settings.schema,
                    ", ".join(redact_url(u) for u in settings.nats_urls),
                    settings.stream,
                    settings.batch_size,
                    format_duration(settings.poll_interval),
                )
                self._started.set()
                self._connections.started = True
                await self._relay_loop()
                tg.cancel_scope.cancel()
        finally:
            # Shielded: a cancelled relay still closes its connections cleanly.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._conn.close()
                if self._spare is not None:
                    await self._spare.close()
                if self._publisher is not None:
                    await self._publisher.close()
        stats = self.stats
        log.info(
            "relay %s stopped: published %d (%d duplicates), retried %d, dead-lettered %d",
            self.relay_id,
            stats.published,
            stats.duplicates,
            stats.retried,
            stats.dead_lettered,
        )

    async def _connect_publisher(self) -> Publisher:
        settings = self.settings
        nc = await connect_nats(settings, name=f"outbox-relay {self.relay_id}")
        try:
            status = await ensure_stream(nc.jetstream(), settings, batches=batch_support(nc))
            log.info("%s", status.describe())
            log.info("%s", publish_note(status.config, nc))
            batches = stream_batches(status.config, nc)
            # Rows over it (with their headers) are dead-lettered, not sent.
            log.info("NATS server max_payload: %d bytes", nc.max_payload)
            for warning in status.warnings:
                log.warning("%s", warning)
            publisher = Publisher(
                nc,
                nc.jetstream(),
                settings.stream,
                settings.publish_timeout,
                ordered=settings.ordered,
                atomic=batches.atomic,
                fast=batches.fast,
                subjects=status.config.subjects or (),
            )
            await publisher.start()
        except BaseException:
            await nc.close()
            raise
        self._connections.nats = self._connections.stream = True
        return publisher

    async def _writable_session(self) -> psycopg.AsyncConnection[Any] | None:
        """The first session. A standby is no error to exit on, since it may be
        promoted: say so once and wait for a primary (None: stopped meanwhile)."""
        backoff = Backoff(initial=0.5)
        said = False
        while not self._stopping.is_set():
            try:
                return await self._open_session()
            except ReadOnlyServerError as exc:
                if not said:
                    log.warning("%s; waiting for a writable primary", _one_line(exc))
                    said = True
            await self._pause(backoff.next_delay())
        return None

    async def _open_session(self, *, main: bool = True) -> psycopg.AsyncConnection[Any]:
        """A session to claim on. The main one also holds the session-level locks (key
        partitions, the idle lock), so a frozen relay's is ended when idle too."""
        conn = await connect_postgres(self.settings, application_name=self._application_name)
        idle_timeout = self.settings.claim_hold_bound
        try:
            await self._require_writable(conn)
            await conn.execute(
                query("configure_session", self.settings.names),
                {
                    "idle_in_transaction": f"{int(idle_timeout * 1000)}ms",
                    "statement_timeout": f"{int(_STATEMENT_TIMEOUT * 1000)}ms",
                },
            )
            await conn.commit()
            if not main:
                return conn
            if conn.info.server_version >= _IDLE_SESSION_TIMEOUT_SINCE:
                idle_session = self.settings.poll_interval + self.settings.claim_hold_bound
                await conn.execute(
                    query("configure_idle_session", self.settings.names),
                    {"idle_session": f"{int(idle_session * 1000)}ms"},
                )
                await conn.commit()
            if self.settings.ordered:
                await self._partitions.join(conn)
        except BaseException:
            await conn.close()
            raise
        self._connections.postgres = True
        return conn

    async def _open_spare(self) -> psycopg.AsyncConnection[Any]:
        return await self._open_session(main=False)

    async def _require_writable(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if await self._store.read_only(conn):
            raise ReadOnlyServerError(
                f"PostgreSQL at {connected_to(conn)} is read-only (a standby?)"
            )

    async def _relay_loop(self) -> None:
        settings = self.settings
        outage = Backoff()
        # Backstop for a stalled network: the publish has its own timeout, the
        # statements theirs, but a dead TCP peer answers neither.
        batch_deadline = settings.publish_timeout + 3 * _STATEMENT_TIMEOUT
        while not self._stopping.is_set():
            publisher = await self._usable_publisher()
            self._connections.nats = publisher is not None and publisher.connected
            if publisher is None or not publisher.connected:
                # Claiming now would only hold row locks while nats-py buffers the
                # messages; the client is reconnecting on its own.
                await self._settle_if_possible()
                await self._keep_session_alive()
                step_down_in = await self._unpublishable(time.monotonic())
                await self._pause(min(outage.next_delay(), step_down_in), until=publisher)
                continue
            self._wakeup.clear()
            attempted = time.monotonic()
            try:
                with anyio.fail_after(batch_deadline):
                    if self._stepped_down:
                        await self._rejoin_when_publishable(publisher)
                    step = await self._step(publisher)
                    wait = await self._after_batch(step.claimed)
            except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
                if not self._session_lost(exc):
                    raise
                # Session-level locks go with their session.
                self._idle, self._holds_idle_lock = _Idle.BUSY, False
                self._partitions.forget()
                self._connections.postgres = False
                delay = outage.next_delay()
                log.warning("PostgreSQL unavailable (%s); retrying in %.1fs", _one_line(exc), delay)
                await self._close_sessions()
                await self._pause(delay)
                await self._reopen_session()
                continue
            if step.result is not None and step.result.transient:
                # The outage began when this batch's publishing did.
                delay = min(outage.next_delay(), await self._unpublishable(attempted))
                log.warning(
                    "%d of %d messages not acknowledged (%s); retrying in %.1fs",
                    step.result.transient,
                    step.published,
                    step.result.transient_reason,
                    delay,
                )
                await self._pause(delay)
                continue
            self._unpublishable_since = None  # nothing failed this round
            outage.reset()
            if wait:
                if self._idle is _Idle.SLEPT:
                    self.metrics.set_state(RelayState.IDLE)
                await self._wakeup.wait(wait)
        await self._settle_if_possible()

    def _session_lost(self, exc: BaseException) -> bool:
        return _connection_lost(exc, self._conn) or (
            self._spare is not None and _connection_lost(exc, self._spare)
        )

    async def _close_sessions(self) -> None:
        self._claimed = self._published = None  # their rows go back with the sessions
        await self._conn.close()
        if self._spare is not None:
            await self._spare.close()

    async def _settle_if_possible(self) -> None:
        """:meth:`_settle`; if PostgreSQL is unreachable, the sessions' rows go back
        with them (the published ones are published again, and deduplicated)."""
        try:
            with anyio.fail_after(_STATEMENT_TIMEOUT):
                await self._settle()
        except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
            if not self._session_lost(exc):
                raise
            await self._close_sessions()

    async def _after_batch(self, claimed: int) -> float:
        """How long to wait before the next claim (0: at once).

        A relay sleeps only after it has made sure producers will wake it: it holds
        the idle lock, or sees another sleeping relay hold it, and has polled once
        more since (sql/migrations/0002_idle_wakeup.sql).
        """
        if claimed or self._idle is _Idle.SLEPT:
            await self._end_idle()
        if claimed or self._in_flight:
            # Only an empty claim with nothing in flight sends a relay towards sleep:
            # under load it stays busy, so producers skip NOTIFY altogether.
            return 0
        if self._partitions.short:
            # Relays that held more than their share give it back within their next
            # batch or two: look again soon rather than sleep.
            return _SHORT_RECHECK
        if self._idle is _Idle.ANNOUNCED:
            self._idle = _Idle.SLEPT
            if self.settings.ordered:
                # Partitions a relay gave up or left behind have no owner to be woken:
                # look for them often.
                return min(self.settings.poll_interval, _REBALANCE_SLEEP)
            return self.settings.poll_interval
        if await self._store.take_idle_lock(self._conn):
            self._holds_idle_lock = True
        elif not await self._store.idle_lock_held_elsewhere(self._conn):
            # Producers between their insert and their commit hold the lock shared;
            # they will not notify. _wait_for_producers wakes us once they commit.
            self._producers_in_flight.set()
            return self.settings.poll_interval
        self._idle = _Idle.ANNOUNCED
        return 0  # the last poll before sleeping

    async def _unpublishable(self, since: float) -> float:
        """Publishing has failed since ``since``: past STEP_DOWN_AFTER, give the key
        partitions back. Returns how soon to look again to step down on time."""
        now = time.monotonic()
        if self._unpublishable_since is None:
            self._unpublishable_since = since
        if not self.settings.ordered:
            return math.inf
        if self._stepped_down:
            return _REJOIN_CHECK  # to rejoin soon after publishing works again
        if (wait := self._unpublishable_since + STEP_DOWN_AFTER - now) > 0:
            return wait
        with contextlib.suppress(psycopg.Error, TimeoutError, ServerUnavailableError):
            # On failure the session is gone, and its locks with it.
            with anyio.fail_after(_STATEMENT_TIMEOUT):
                await self._partitions.leave(self._conn)
        self._partitions.forget()
        self._stepped_down = True
        log.warning(
            "cannot publish for %.0fs: gave the key partitions back to the other relays",
            now - self._unpublishable_since,
        )
        return _REJOIN_CHECK

    async def _rejoin_when_publishable(self, publisher: Publisher) -> None:
        """Take a share of the partitions again once the stream answers."""
        now = time.monotonic()
        if now < self._next_rejoin_check:
            return
        self._next_rejoin_check = now + _REJOIN_CHECK
        if not await publisher.stream_exists():
            return
        self._stepped_down = False
        self._unpublishable_since = None
        await self._partitions.join(self._conn)
        log.info("publishing again: rejoined the relays")

    async def _end_idle(self) -> None:
        if self._holds_idle_lock:
            await self._store.release_idle_lock(self._conn)
            self._holds_idle_lock = False
        self._idle = _Idle.BUSY

    async def _usable_publisher(self) -> Publisher | None:
        """The publisher, rebuilt if its client gave up reconnecting and closed."""
        if self._publisher is not None and not self._publisher.closed:
            return self._publisher
        if self._publisher is not None:
            log.warning("NATS client closed; connecting a new one")
            self._publisher = None
        try:
            self._publisher = await self._connect_publisher()
        except ServerUnavailableError as exc:
            log.warning("%s", exc)
        return self._publisher

    async def _pause(self, seconds: float, *, until: Publisher | None = None) -> None:
        """Sit out an outage: new rows do not end it, only time or stop() does, or
        ``until`` reconnecting (the backoff grows long during a long NATS outage)."""
        if not self._stopping.is_set():
            self.metrics.set_state(RelayState.OUTAGE)
        with anyio.move_on_after(seconds):
            if until is None:
                await self._stopping.wait()
                return
            # nats-py tells reconnects only to the callbacks connect_nats gave it.
            while not (self._stopping.is_set() or until.connected):  # noqa: ASYNC110
                await anyio.sleep(_RECONNECT_POLL)  # a flag of the client: cheap to read

    async def _keep_session_alive(self) -> None:
        """A statement, so idle_session_timeout (meant for a frozen relay) spares us."""
        if self._conn.closed:
            return
        with contextlib.suppress(psycopg.Error, TimeoutError), anyio.fail_after(_STATEMENT_TIMEOUT):
            await self._store.ping(self._conn)

    async def _reopen_session(self) -> None:
        # On failure the old, closed connection stays: the next batch fails fast and
        # backs off again, and says why it could not reconnect.
        try:
            self._conn = await self._open_session()
            self._spare = await self._open_spare()
        except (ServerUnavailableError, psycopg.OperationalError) as exc:
            self._reopen_error = _one_line(exc)
        else:
            self._reopen_error = ""

    async def _step(self, publisher: Publisher) -> _Step:
        """One turn of the pipeline: publish the batch claimed last turn while, on the
        other session, the batch published last turn is finished and the next claimed.

        A claim overlaps a publish only when nothing can go out of order: in ordered
        mode a batch claimed during the publish of the one before holds back the keys
        that batch did not get stored (their later rows may be in it), and while it
        holds any, or partitions are to be given back, or the batch published holds
        rows locked past the byte budget, the next claim waits until nothing is in
        flight.
        """
        ready, finishing = self._claimed, self._published
        self._claimed = self._published = None
        held: frozenset[str] = frozenset()
        if ready is not None and finishing is not None and self.settings.ordered:
            held = finishing.unsettled_keys()
        claim = not self._stopping.is_set() and (
            ready is None
            or not (
                held or self._partitions.must_settle or (self.settings.ordered and ready.locks_more)
            )
        )
        claimed: _Batch | None = None

        async def publish() -> None:
            if ready is not None:
                await self._publish(ready, publisher, held)

        async def finish_then_claim() -> None:
            nonlocal claimed
            if finishing is not None:
                await self._finish(finishing)
            if claim:
                # The session not publishing; the main one when nothing is in flight.
                if ready is None:
                    claimed = await self._claim(self._conn, settled=True)
                elif ready.conn is self._conn:
                    claimed = await self._claim(self._other_session())
                else:
                    claimed = await self._claim(self._conn)

        try:
            await _concurrently(publish, finish_then_claim)
        except BaseException:
            # Their sessions are closed (or the relay stops on a bug): rows go back.
            self._claimed = self._published = None
            raise
        self._claimed = claimed
        if ready is None:
            return _Step(claimed.size if claimed else 0)
        result = ready.result
        if result.transient:
            # An outage: the claim behind it waits with everything else.
            self._claimed = None
            await self._finish(ready)
            if claimed is not None:
                await claimed.conn.rollback()
            # Rows wait: not a reason to go idle (that is for an empty outbox).
            return _Step(ready.size, ready.size, result)
        self._published = ready
        return _Step(claimed.size if claimed else 0, ready.size, result)

    @property
    def _in_flight(self) -> bool:
        return self._claimed is not None or self._published is not None

    async def _settle(self) -> None:
        """Finish the batch published and give back the one claimed (stop, outage)."""
        claimed, published = self._claimed, self._published
        self._claimed = self._published = None
        if published is not None:
            await self._finish(published)
        if claimed is not None:
            await claimed.conn.rollback()

    def _other_session(self) -> psycopg.AsyncConnection[Any]:
        if self._spare is None or self._spare.closed:
            raise ServerUnavailableError(self._reopen_error or "connection closed")
        return self._spare

    async def _claim(
        self, conn: psycopg.AsyncConnection[Any], *, settled: bool = False
    ) -> _Batch | None:
        """Claim a batch in a transaction of ``conn``, left open; None if nothing is due.

        ``settled``: no other batch is in flight, so partitions may be given back.
        """
        if conn.closed:
            raise ServerUnavailableError(self._reopen_error or "connection closed")
        settings = self.settings
        scope = UNORDERED
        if settings.ordered:
            if conn is self._conn:  # the session holding the partitions, free now
                await self._partitions.rebalance(conn, settled=settled)
            scope = ClaimScope(
                ordered=True,
                partitions=self._partitions.claimable,
                hold_behind_dead_letters=settings.dead_letter_policy == "hold",
                # The main session holds the partitions; it may be gone (frozen relay).
                owner_pid=None if conn is self._conn else self._conn.info.backend_pid,
            )
        limit = settings.batch_size
        if self._bytes_per_row:
            limit = max(1, min(limit, int(settings.batch_max_bytes / self._bytes_per_row)))
        messages = await self._store.claim(conn, limit, scope, max_bytes=settings.batch_max_bytes)
        # Past this no wave starts: the claim's locks may be gone by then.
        send_until = time.monotonic() + settings.publish_timeout
        if not messages:
            await conn.rollback()
            return None
        payload_bytes = sum(len(m.payload) for m in messages)
        self._bytes_per_row = payload_bytes / len(messages)
        self.metrics.set_state(RelayState.BUSY)
        self.metrics.batch_rows.observe(len(messages))
        failpoint(AFTER_CLAIM)
        # Rows past the byte budget stay locked: only in a batch that reached it with
        # fewer rows than it locked at most.
        locks_more = payload_bytes >= settings.batch_max_bytes and len(messages) < limit
        return _Batch(conn, messages, send_until, locks_more)

    async def _publish(self, batch: _Batch, publisher: Publisher, held: frozenset[str]) -> None:
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
        with self.metrics.publish_seconds.time():
            batch.result = await publisher.publish_batch(messages, send_until=batch.send_until)

    async def _finish(self, batch: _Batch) -> None:
        """Delete the rows published, record the failures, commit: the claim ends."""
        result, conn = batch.result, batch.conn
        await self._store.delete(conn, result.published)
        outcome = await self._store.record_failures(conn, result.failures)
        failpoint(AFTER_ACK)
        await conn.commit()
        stats = self.stats
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
                "%d rows moved to the dead letters after %d attempts",
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

    async def _watch(self) -> None:
        """Refresh the lag gauges and what readiness checks, every ``lag_interval``.

        A connection of its own: the relay's session is inside batch transactions and
        the listener's is waiting for notifications.
        """
        conn: psycopg.AsyncConnection[Any] | None = None
        bloated = False  # warn when the table turns bloated, not on every refresh
        squatted = False  # likewise for partitions held by sessions that are not relays
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await connect_postgres(
                            self.settings,
                            autocommit=True,
                            application_name=self._application_name,
                        )
                    with anyio.fail_after(_STATEMENT_TIMEOUT):
                        lag = await self._store.lag(conn)
                        health = await self._store.table_health(conn)
                        squatters = (
                            await self._store.partition_squatters(conn)
                            if self.settings.ordered
                            else []
                        )
                    self.metrics.record_lag(lag, health)
                    self.metrics.partitions_squatted.set(sum(s.partitions for s in squatters))
                    if squatters and not squatted:
                        for squatter in squatters:
                            log.warning(
                                "%s: their keys wait (README: Guarantees)", squatter.describe()
                            )
                    squatted = bool(squatters)
                    bloat = health.bloat_warning()
                    if bloat and not bloated:
                        log.warning("%s", bloat)
                    bloated = bloat is not None
                    self._connections.postgres = not (self._conn.closed or self._conn.broken)
                except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
                    if conn is not None and not _connection_lost(exc, conn):
                        raise
                    self._connections.postgres = False
                    if conn is not None:
                        await conn.close()
                    conn = None
                publisher = self._publisher
                if publisher is not None and publisher.connected:
                    self._connections.nats = True
                    self._connections.stream = await publisher.stream_exists()
                else:
                    self._connections.nats = False
                await anyio.sleep(self.settings.lag_interval)
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def _wait_for_producers(self) -> None:
        """Wake the relay when producers in flight have committed, without polling.

        A connection of its own queues for the idle lock that in-flight producers hold
        shared (sql/queries.sql: wait_for_producers). At most one poll interval, so a
        producer that never commits costs a few statements per interval.
        """
        conn: psycopg.AsyncConnection[Any] | None = None
        backoff = Backoff()
        try:
            while True:
                await self._producers_in_flight.wait(math.inf)
                self._producers_in_flight.clear()
                try:
                    if conn is None or conn.closed:
                        conn = await connect_postgres(
                            self.settings, application_name=self._application_name
                        )
                    at_most = self.settings.poll_interval
                    with anyio.fail_after(at_most + _STATEMENT_TIMEOUT):
                        await self._store.wait_for_producers(conn, at_most)
                    backoff.reset()
                except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
                    if conn is not None and not _connection_lost(exc, conn):
                        raise
                    if conn is not None:
                        await conn.close()
                    conn = None
                    # The relay loop handles the outage; just do not spin.
                    await anyio.sleep(backoff.next_delay())
                self._wakeup.set()
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def _listen(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Turn notifications into wake-ups; re-poll after every (re)connect."""
        backoff = Backoff()
        started = False
        while True:
            try:
                conn = await connect_postgres(
                    self.settings, autocommit=True, application_name=self._application_name
                )
            except ServerUnavailableError as exc:
                if not started:
                    raise
                delay = backoff.next_delay()
                log.warning("listener: %s; retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)
                continue
            try:
                async with conn:
                    await conn.execute(query("listen", self.settings.names))
                    backoff.reset()
                    # Notifications sent while we were not listening are lost: poll now.
                    self._wakeup.set()
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        async for _ in conn.notifies(timeout=_LISTEN_PROBE_INTERVAL):
                            self._wakeup.set()
                        # Quiet for a while: make sure the connection is still alive.
                        with anyio.fail_after(_STATEMENT_TIMEOUT):
                            await conn.execute("SELECT 1")
            except (psycopg.Error, TimeoutError) as exc:
                if not _connection_lost(exc, conn):
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "listener lost its connection (%s); reconnecting in %.1fs",
                    _one_line(exc),
                    delay,
                )
                await anyio.sleep(delay)
            finally:
                # psycopg's exit rolls back before it closes; a relay stopping cancels
                # that rollback, and the connection would stay open until collected.
                with anyio.CancelScope(shield=True):
                    await conn.close()


def _connection_lost(exc: BaseException, conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an error means "reconnect and carry on" rather than a bug to report.

    A session ended by the server (idle-in-transaction timeout, admin shutdown,
    restart) surfaces as several error classes; what they share is a dead connection.
    """
    if isinstance(exc, TimeoutError | ServerUnavailableError | psycopg.OperationalError):
        return True
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return True  # the server became a standby (or we reached one): find the primary
    return bool(conn.closed or conn.broken)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
