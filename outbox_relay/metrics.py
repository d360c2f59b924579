"""Prometheus metrics and the health endpoints of a relay process.

Counters are read from the relay's :class:`RelayStats` at scrape
time, so the hot path pays nothing for them; only the two histograms are observed
per batch. Every metric lives in the relay's own registry, never the global one.

One HTTP port serves ``/metrics``, ``/healthz`` (the process answers) and
``/readyz`` (connected to PostgreSQL and NATS, stream present, not stopping).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client import Enum as StateEnum
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from outbox_relay.store import Lag, TableHealth

log = logging.getLogger(__name__)

PREFIX = "outbox_relay"


class RelayState(enum.Enum):
    STARTING = "starting"
    BUSY = "busy"  # claiming and publishing
    IDLE = "idle"  # caught up, waiting for a notification or the poll
    OUTAGE = "outage"  # waiting out PostgreSQL or NATS
    STOPPING = "stopping"


# Lag and TableHealth field -> metric name and help.
_LAG_GAUGES = {
    "pending": ("outbox_pending_rows", "Rows waiting in the outbox (dead letters excluded)"),
    "oldest_age_seconds": (
        "outbox_oldest_age_seconds",
        "Age of the oldest waiting row (0 when none waits)",
    ),
    "dead_letters": ("dead_letter_rows", "Rows in the dead-letter table"),
    "held": (
        "outbox_held_rows",
        "Rows waiting behind a dead-lettered row of their ordering key (hold policy)",
    ),
    "dead_rows": ("outbox_dead_tuples", "Dead rows in the outbox table awaiting vacuum"),
    "size_bytes": ("outbox_table_bytes", "Size of the outbox table with its indexes"),
}
_HEALTH_FIELDS = frozenset({"dead_rows", "size_bytes"})


@dataclass(slots=True)
class Connections:
    """What readiness is made of; updated by the relay and its lag watcher."""

    postgres: bool = False
    nats: bool = False
    stream: bool = False
    started: bool = False
    stopping: bool = False

    def problems(self) -> list[str]:
        found = []
        if not self.started:
            found.append("relay not started")
        if self.stopping:
            found.append("relay stopping")
        if not self.postgres:
            found.append("PostgreSQL unreachable")
        if not self.nats:
            found.append("NATS disconnected")
        if not self.stream:
            found.append("stream missing")
        return found


@dataclass(slots=True)
class RelayStats:
    """The relay's running totals, which the counters read at scrape time."""

    batches: int = 0
    published: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0


class _StatsCollector(Collector):
    """Counters straight from the relay's running totals."""

    def __init__(self, stats: RelayStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._stats
        events = CounterMetricFamily(
            f"{PREFIX}_events",
            "Outbox rows handled, by outcome: ok (published), duplicate (JetStream had it "
            "already), failed (attempt failed, retry scheduled), dead_lettered.",
            labels=["outcome"],
        )
        events.add_metric(["ok"], stats.published - stats.duplicates)
        events.add_metric(["duplicate"], stats.duplicates)
        events.add_metric(["failed"], stats.retried)
        events.add_metric(["dead_lettered"], stats.dead_lettered)
        yield events
        yield CounterMetricFamily(
            f"{PREFIX}_batches", "Claimed batches relayed.", value=stats.batches
        )

    def describe(self) -> Iterable[CounterMetricFamily]:
        return self.collect()


class RelayMetrics:
    def __init__(self, stats: RelayStats, *, relay_id: str, stream: str, schema: str) -> None:
        self.registry = CollectorRegistry()
        self.connections = Connections()
        registry = self.registry
        registry.register(_StatsCollector(stats))
        build = Info(f"{PREFIX}_build", "Version and what the relay relays.", registry=registry)
        build.info(
            {
                "version": version("outbox-relay"),
                "relay_id": relay_id,
                "stream": stream,
                "schema": schema,
            }
        )
        self.batch_rows = Histogram(
            f"{PREFIX}_batch_rows",
            "Rows per claimed batch.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=registry,
        )
        self.publish_seconds = Histogram(
            f"{PREFIX}_publish_duration_seconds",
            "From a batch's first publish to its last PubAck.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self._state = StateEnum(
            f"{PREFIX}_state",
            "What the relay loop is doing.",
            states=[state.value for state in RelayState],
            registry=registry,
        )
        self._state.state(RelayState.STARTING.value)
        # Refreshed together from the lag view and the table's statistics.
        self._lag_gauges = {
            source: Gauge(
                f"{PREFIX}_{name}", f"{text}, as of the last lag refresh.", registry=registry
            )
            for source, (name, text) in _LAG_GAUGES.items()
        }
        self.lag_refreshed = Gauge(
            f"{PREFIX}_lag_refresh_timestamp_seconds",
            "When the lag gauges were last refreshed (Unix time).",
            registry=registry,
        )
        up = Gauge(
            f"{PREFIX}_connected",
            "1 while the relay is connected to the server, else 0.",
            ["server"],
            registry=registry,
        )
        connections = self.connections
        up.labels("postgres").set_function(lambda: connections.postgres)
        up.labels("nats").set_function(lambda: connections.nats)
        Gauge(
            f"{PREFIX}_stream_present",
            "1 while the stream exists, as of the last lag refresh.",
            registry=registry,
        ).set_function(lambda: connections.stream)
        Gauge(f"{PREFIX}_ready", "1 while /readyz answers 200.", registry=registry).set_function(
            lambda: not connections.problems()
        )
        self.partitions_owned = Gauge(
            f"{PREFIX}_partitions_owned",
            "Key partitions this relay owns (ordered mode).",
            registry=registry,
        )
        self.partitions_squatted = Gauge(
            f"{PREFIX}_partitions_held_by_non_relays",
            "Key partitions held by sessions that are not relays: their keys' rows wait, "
            "as of the last lag refresh.",
            registry=registry,
        )

    def set_state(self, state: RelayState) -> None:
        self._state.state(state.value)

    def record_lag(self, lag: Lag, health: TableHealth) -> None:
        for source, gauge in self._lag_gauges.items():
            gauge.set(getattr(health if source in _HEALTH_FIELDS else lag, source))
        self.lag_refreshed.set_to_current_time()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds are not news."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


WSGIApp = Callable[["WSGIEnvironment", "StartResponse"], Iterable[bytes]]


def health_app(metrics: RelayMetrics) -> WSGIApp:
    serve_metrics: WSGIApp = make_wsgi_app(metrics.registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return serve_metrics(environ, start_response)
        if path == "/healthz":
            status, body = "200 OK", "ok\n"
        elif path == "/readyz":
            problems = metrics.connections.problems()
            status = "503 Service Unavailable" if problems else "200 OK"
            body = "".join(f"{problem}\n" for problem in problems) or "ready\n"
        else:
            status, body = "404 Not Found", "try /metrics, /healthz or /readyz\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]

    return app


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, in a daemon thread."""

    def __init__(self, metrics: RelayMetrics, host: str, port: int) -> None:
        self._server = make_server(
            host, port, health_app(metrics), _ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outbox-relay-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
