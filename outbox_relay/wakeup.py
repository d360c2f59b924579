"""How a sleeping relay is woken: notifications, the idle lock, producers in flight.

Producers notify only while a relay sleeps (sql/migrations/0002_idle_wakeup.sql): a
relay about to sleep takes the idle lock, polls once more, and only then sleeps.
While producers between their insert and their commit hold that lock shared, it
cannot be taken; a connection of its own queues for it and wakes the relay when they
have committed. Polling stays the safety net, since notifications can be lost.
"""

from __future__ import annotations

import enum
import logging
import math
from typing import Any

import anyio
import anyio.abc
import psycopg

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import ServerUnavailableError
from outbox_relay.outages import STATEMENT_TIMEOUT, Backoff, connection_lost, one_line
from outbox_relay.queries import query
from outbox_relay.store import OutboxStore

log = logging.getLogger(__name__)

# How long the listener waits for a notification before it checks its connection.
_LISTEN_PROBE_INTERVAL = 30.0
# Longest an idle relay sleeps in ordered mode, between looks at the partitions.
_REBALANCE_SLEEP = 2.0
# How soon a relay below its share of partitions looks again.
_SHORT_RECHECK = 0.1


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


class _Idle(enum.Enum):
    BUSY = "busy"
    ANNOUNCED = "announced"  # wake-ups assured; one more poll, then sleep
    SLEPT = "slept"


class Wakeups:
    """The relay's way to sleep without missing a row: :meth:`after_batch` decides
    how long, :meth:`listen` and :meth:`wait_for_producers` (tasks) end the sleep."""

    def __init__(self, settings: Settings, store: OutboxStore, application_name: str) -> None:
        self.settings = settings
        self._store = store
        self._application_name = application_name
        self.wakeup = Wakeup()
        # Set when producers in flight keep the relay from sleeping: wait_for_producers
        # wakes the relay once they have committed.
        self._producers_in_flight = Wakeup()
        self._idle = _Idle.BUSY
        self._holds_idle_lock = False
        # Woken with rows to publish: the idle lock is given back alongside their
        # publish (release_alongside), not between their claim and their publish.
        self._release_later = False

    @property
    def slept(self) -> bool:
        return self._idle is _Idle.SLEPT

    def forget(self) -> None:
        """The session is gone, and its session-level idle lock with it."""
        self._idle, self._holds_idle_lock, self._release_later = _Idle.BUSY, False, False

    async def after_batch(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        claimed: int,
        in_flight: bool,
        recheck_soon: bool,
    ) -> float:
        """How long to wait before the next claim (0: at once).

        A relay sleeps only after it has made sure producers will wake it: it holds
        the idle lock, or sees another sleeping relay hold it, and has polled once
        more since. ``conn``: the session holding the relay's session-level locks.
        ``recheck_soon``: the relay holds less than its share of partitions.
        """
        if claimed and self._holds_idle_lock:
            # Held a little longer, producers notify a little longer: harmless.
            self._idle, self._release_later = _Idle.BUSY, True
        elif claimed or self._idle is _Idle.SLEPT:
            await self._end_idle(conn)
        if claimed or in_flight:
            # Only an empty claim with nothing in flight sends a relay towards sleep:
            # under load it stays busy, so producers skip NOTIFY altogether.
            return 0
        if recheck_soon:
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
        await self.release_alongside(conn)  # (already done by a step; the lock nests)
        if await self._store.take_idle_lock(conn):
            self._holds_idle_lock = True
        elif not await self._store.idle_lock_held_elsewhere(conn):
            # Producers between their insert and their commit hold the lock shared;
            # they will not notify. wait_for_producers wakes us once they commit.
            self._producers_in_flight.set()
            return self.settings.poll_interval
        self._idle = _Idle.ANNOUNCED
        return 0  # the last poll before sleeping

    async def release_alongside(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give back the idle lock kept past a wake-up, if any: run beside the
        publish of the rows the relay woke for, on the session holding the lock."""
        if self._release_later:
            self._release_later = False
            await self._end_idle(conn)

    async def _end_idle(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._holds_idle_lock:
            await self._store.release_idle_lock(conn)
            self._holds_idle_lock = False
        self._idle = _Idle.BUSY

    async def wait_for_producers(self) -> None:
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
                    with anyio.fail_after(at_most + STATEMENT_TIMEOUT):
                        await self._store.wait_for_producers(conn, at_most)
                    backoff.reset()
                except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
                    if conn is not None and not connection_lost(exc, conn):
                        raise
                    if conn is not None:
                        await conn.close()
                    conn = None
                    # The relay loop handles the outage; just do not spin.
                    await anyio.sleep(backoff.next_delay())
                self.wakeup.set()
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def listen(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
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
                    self.wakeup.set()
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        async for _ in conn.notifies(timeout=_LISTEN_PROBE_INTERVAL):
                            self.wakeup.set()
                        # Quiet for a while: make sure the connection is still alive.
                        with anyio.fail_after(STATEMENT_TIMEOUT):
                            await conn.execute("SELECT 1")
            except (psycopg.Error, TimeoutError) as exc:
                if not connection_lost(exc, conn):
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "listener lost its connection (%s); reconnecting in %.1fs",
                    one_line(exc),
                    delay,
                )
                await anyio.sleep(delay)
            finally:
                # psycopg's exit rolls back before it closes; a relay stopping cancels
                # that rollback, and the connection would stay open until collected.
                with anyio.CancelScope(shield=True):
                    await conn.close()
