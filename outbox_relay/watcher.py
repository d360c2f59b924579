"""What the relay shows operators between batches: lag gauges, readiness, warnings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import psycopg

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import ServerUnavailableError
from outbox_relay.metrics import RelayMetrics
from outbox_relay.outages import STATEMENT_TIMEOUT, connection_lost
from outbox_relay.publish import Publisher
from outbox_relay.sessions import Sessions
from outbox_relay.store import OutboxStore

log = logging.getLogger(__name__)


async def watch(
    settings: Settings,
    store: OutboxStore,
    metrics: RelayMetrics,
    sessions: Sessions,
    publisher: Callable[[], Publisher | None],
) -> None:
    """Refresh the lag gauges and what readiness checks, every ``lag_interval``.

    A connection of its own: the relay's sessions are inside batch transactions and
    the listener's is waiting for notifications. ``publisher``: the relay's current
    one, which it replaces when its client gives up.
    """
    connections = metrics.connections
    conn: psycopg.AsyncConnection[Any] | None = None
    bloated = False  # warn when the table turns bloated, not on every refresh
    squatted = False  # likewise for partitions held by sessions that are not relays
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = await connect_postgres(
                        settings, autocommit=True, application_name=sessions.application_name
                    )
                with anyio.fail_after(STATEMENT_TIMEOUT):
                    lag = await store.lag(conn)
                    health = await store.table_health(conn)
                    squatters = await store.partition_squatters(conn) if settings.ordered else []
                metrics.record_lag(lag, health)
                metrics.partitions_squatted.set(sum(s.partitions for s in squatters))
                if squatters and not squatted:
                    for squatter in squatters:
                        log.warning("%s: their keys wait (README: Guarantees)", squatter.describe())
                squatted = bool(squatters)
                bloat = health.bloat_warning()
                if bloat and not bloated:
                    log.warning("%s", bloat)
                bloated = bloat is not None
                main = sessions.first()
                connections.postgres = not (main.closed or main.broken)
            except (psycopg.Error, TimeoutError, ServerUnavailableError) as exc:
                if conn is not None and not connection_lost(exc, conn):
                    raise
                connections.postgres = False
                if conn is not None:
                    await conn.close()
                conn = None
            current = publisher()
            if current is not None and current.connected:
                connections.nats = True
                connections.stream = await current.stream_exists()
            else:
                connections.nats = False
            await anyio.sleep(settings.lag_interval)
    finally:
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()
