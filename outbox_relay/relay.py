"""The relay: wake, claim, publish, acknowledge, repeat, until told to stop.

:class:`Relay` composes the parts, each a module of its own:

* :mod:`~outbox_relay.sessions`: the two PostgreSQL sessions and the key partitions
  the first one holds;
* :mod:`~outbox_relay.pipeline`: claim → publish → finish, one batch per
  transaction, the two sessions taking turns;
* :mod:`~outbox_relay.wakeup`: sleeping without missing a row (notifications, the
  idle lock, producers in flight);
* :mod:`~outbox_relay.liveness`: stepping down when it cannot publish, rejoining;
* :mod:`~outbox_relay.watcher`: lag gauges and readiness for operators.

What is left here is the loop that drives them and rides out outages.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time

import anyio
import nats.errors
import psycopg

from outbox_relay.config import Settings, format_duration, redact_url
from outbox_relay.database import connected_to
from outbox_relay.errors import OutboxError, ReadOnlyServerError, ServerUnavailableError
from outbox_relay.jetstream import (
    batch_support,
    connect_nats,
    ensure_stream,
    publish_note,
    stream_batches,
)
from outbox_relay.liveness import Liveness
from outbox_relay.logs import relay_id_context
from outbox_relay.metrics import RelayMetrics, RelayState, RelayStats
from outbox_relay.outages import STATEMENT_TIMEOUT, Backoff, one_line
from outbox_relay.partitions import PartitionOwner
from outbox_relay.pipeline import Pipeline
from outbox_relay.publish import Publisher
from outbox_relay.schema import ensure_migrated
from outbox_relay.sessions import Sessions
from outbox_relay.store import OutboxLayout, OutboxStore, RetryPolicy
from outbox_relay.wakeup import Wakeups
from outbox_relay.watcher import watch

log = logging.getLogger(__name__)

# How often a relay waiting out a NATS outage looks whether the client reconnected.
_RECONNECT_POLL = 0.1


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
        partitions = PartitionOwner(self._store, self.relay_id)
        self.metrics.partitions_owned.set_function(lambda: len(partitions.owned))
        application_name = f"outbox-relay {self.relay_id}"[:63]
        self._sessions = Sessions(
            settings, self._store, partitions, self._connections, application_name
        )
        self._stopping = anyio.Event()
        self._started = anyio.Event()
        # Our table's layout; the same store answers what does not depend on it.
        layout: OutboxLayout = self._store
        self._pipeline = Pipeline(
            settings,
            layout,
            self._store,
            self._sessions,
            metrics=self.metrics,
            stats=self.stats,
            stopping=self._stopping,
        )
        self._wakeups = Wakeups(settings, self._store, application_name)
        self._liveness = Liveness(self._sessions, ordered=settings.ordered)
        self._publisher: Publisher | None = None

    def stop(self) -> None:
        """Stop claiming; the batch in flight is finished first. Safe from a signal task."""
        self._stopping.set()
        self._connections.stopping = True
        self.metrics.set_state(RelayState.STOPPING)
        self._wakeups.wakeup.set()

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
        if not await self._open_writable_session():
            return  # stopped while waiting for a primary
        sessions = self._sessions
        try:
            await ensure_migrated(sessions.first(), settings.names)
            await sessions.open_spare()
            self._publisher = await self._connect_publisher()
            async with anyio.create_task_group() as tg:
                await tg.start(self._wakeups.listen)
                tg.start_soon(
                    watch, settings, self._store, self.metrics, sessions, self._current_publisher
                )
                tg.start_soon(self._wakeups.wait_for_producers)
                log.info(
                    "relay %s started: database %s, schema %s, NATS %s, stream %s, "
                    "batch size %d, poll interval %s",
                    self.relay_id,
                    connected_to(sessions.first()),
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
                await sessions.close()
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

    async def _open_writable_session(self) -> bool:
        """The first session. A standby is no error to exit on, since it may be
        promoted: say so once and wait for a primary (False: stopped meanwhile)."""
        backoff = Backoff(initial=0.5)
        said = False
        while not self._stopping.is_set():
            try:
                await self._sessions.open_main()
            except ReadOnlyServerError as exc:
                if not said:
                    log.warning("%s; waiting for a writable primary", one_line(exc))
                    said = True
            else:
                return True
            await self._pause(backoff.next_delay())
        return False

    async def _relay_loop(self) -> None:
        settings = self.settings
        sessions, pipeline, wakeups = self._sessions, self._pipeline, self._wakeups
        liveness = self._liveness
        outage = Backoff()
        # Backstop for a stalled network: the publish has its own timeout, the
        # statements theirs, but a dead TCP peer answers neither.
        batch_deadline = settings.publish_timeout + 3 * STATEMENT_TIMEOUT
        while not self._stopping.is_set():
            publisher = await self._usable_publisher()
            self._connections.nats = publisher is not None and publisher.connected
            if publisher is None or not publisher.connected:
                # Claiming now would only hold row locks while nats-py buffers the
                # messages; the client is reconnecting on its own.
                await pipeline.settle_if_possible()
                await sessions.keep_alive()
                step_down_in = await liveness.unpublishable(time.monotonic())
                await self._pause(min(outage.next_delay(), step_down_in), until=publisher)
                continue
            wakeups.wakeup.clear()
            attempted = time.monotonic()
            try:
                with anyio.fail_after(batch_deadline):
                    if liveness.stepped_down:
                        await liveness.rejoin_when_publishable(publisher)
                    main = sessions.first()
                    step = await pipeline.step(
                        publisher, functools.partial(wakeups.release_alongside, main)
                    )
                    wait = await wakeups.after_batch(
                        main,
                        claimed=step.claimed,
                        in_flight=pipeline.in_flight,
                        recheck_soon=sessions.partitions.short,
                    )
            except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
                if not sessions.lost(exc):
                    raise
                await self._reconnect_postgres(exc, outage.next_delay())
                continue
            if step.result is not None and step.result.stream_missing:
                await self._recreate_stream(publisher)
            if step.result is not None and step.result.transient:
                # The outage began when this batch's publishing did.
                delay = min(outage.next_delay(), await liveness.unpublishable(attempted))
                log.warning(
                    "%d of %d messages not acknowledged (%s); retrying in %.1fs",
                    step.result.transient,
                    step.published,
                    step.result.transient_reason,
                    delay,
                )
                await self._pause(delay)
                continue
            liveness.publishing_works()  # nothing failed this round
            outage.reset()
            if wait:
                if wakeups.slept:
                    self.metrics.set_state(RelayState.IDLE)
                await wakeups.wakeup.wait(wait)
        await pipeline.settle_if_possible()

    async def _reconnect_postgres(self, exc: BaseException, delay: float) -> None:
        """A session is gone, and with it its session-level locks (partitions, the idle
        lock) and its batch's row locks: start again from new sessions."""
        self._wakeups.forget()
        self._sessions.partitions.forget()
        self._connections.postgres = False
        log.warning("PostgreSQL unavailable (%s); retrying in %.1fs", one_line(exc), delay)
        self._pipeline.drop()
        await self._sessions.close()
        await self._pause(delay)
        await self._sessions.reopen()
        if not self._sessions.reopen_error:
            log.info("PostgreSQL reachable again (%s)", connected_to(self._sessions.first()))

    async def _recreate_stream(self, publisher: Publisher) -> None:
        """The stream was deleted under the relay: create it as at start (its rows
        waited in the outbox meanwhile). An operator's own stream comes back with our
        settings, so the warning says what was made."""
        nc = publisher.client
        try:
            with anyio.fail_after(STATEMENT_TIMEOUT):
                status = await ensure_stream(
                    nc.jetstream(), self.settings, batches=batch_support(nc)
                )
        except (OutboxError, nats.errors.Error, TimeoutError) as exc:
            log.warning("stream %s missing, and not recreated: %s", self.settings.stream, exc)
            return
        if status.created:
            log.warning(
                "stream %s was deleted: %s, as at start", self.settings.stream, status.describe()
            )

    def _current_publisher(self) -> Publisher | None:
        return self._publisher

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
