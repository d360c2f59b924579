"""Relay commands: run (in production), demo (on embedded servers)."""

from __future__ import annotations

import logging
import signal
from typing import Any

import anyio
import click

from outbox_relay import config
from outbox_relay.cli.options import (
    DATABASE_OPTIONS,
    NATS_OPTIONS,
    duration,
    option,
    run_async,
    settings_from,
    with_options,
)
from outbox_relay.config import (
    DEFAULT_BATCH_SIZE,
)
from outbox_relay.errors import ConfigError
from outbox_relay.metrics import HealthServer
from outbox_relay.relay import Relay

log = logging.getLogger("outbox_relay")

RELAY_OPTIONS = [
    option(
        "--batch-size",
        envvar="OUTBOX_BATCH_SIZE",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="Rows claimed and published per transaction.",
    ),
    option(
        "--batch-max-bytes",
        envvar="OUTBOX_BATCH_MAX_BYTES",
        type=click.IntRange(min=1),
        default=config.DEFAULT_BATCH_MAX_BYTES,
        help="Payload bytes per batch at most (a larger row still goes, alone); bounds memory.",
    ),
    option(
        "--poll-interval",
        envvar="OUTBOX_POLL_INTERVAL",
        callback=duration,
        default="5s",
        help="Poll this often even without notifications.",
    ),
    option(
        "--max-attempts",
        envvar="OUTBOX_MAX_ATTEMPTS",
        type=int,
        default=10,
        help="Failed publishes of a row before it is dead-lettered.",
    ),
    option(
        "--retry-backoff",
        envvar="OUTBOX_RETRY_BACKOFF",
        callback=duration,
        default="1s",
        help="First delay before a failed row is retried; doubles per attempt.",
    ),
    option(
        "--retry-backoff-max",
        envvar="OUTBOX_RETRY_BACKOFF_MAX",
        callback=duration,
        default="5m",
        help="Longest delay between a failed row's attempts.",
    ),
    option(
        "--publish-timeout",
        envvar="OUTBOX_PUBLISH_TIMEOUT",
        callback=duration,
        default="10s",
        help="How long a batch waits for its PubAcks.",
    ),
    option(
        "--ordering/--no-ordering",
        envvar="OUTBOX_ORDERING",
        default=True,
        help="Publish each ordering key's rows one relay at a time, in causal order.",
    ),
    option(
        "--standby-confirmed/--no-standby-confirmed",
        envvar="OUTBOX_STANDBY_CONFIRMED",
        default=False,
        help="Publish a batch only once a streaming standby has flushed it, so a failover "
        "cannot take back what was published (the role needs pg_monitor).",
    ),
    option(
        "--dead-letter-policy",
        envvar="OUTBOX_DEAD_LETTER_POLICY",
        type=click.Choice(["hold", "skip"]),
        default="hold",
        help="After a keyed row is dead-lettered: hold its key's later rows, or skip it.",
    ),
    option(
        "--metrics-host",
        envvar="OUTBOX_METRICS_HOST",
        default=config.DEFAULT_METRICS_HOST,
        help="Address of /metrics, /healthz and /readyz.",
    ),
    option(
        "--metrics-port",
        envvar="OUTBOX_METRICS_PORT",
        type=int,
        default=config.DEFAULT_METRICS_PORT,
        help="Port of /metrics, /healthz and /readyz (0: not served).",
    ),
    option(
        "--lag-interval",
        envvar="OUTBOX_LAG_INTERVAL",
        callback=duration,
        default="10s",
        help="How often the lag gauges and readiness are refreshed.",
    ),
    option(
        "--consumer",
        "consumers",
        envvar="OUTBOX_CONSUMERS",
        multiple=True,
        default=(),
        show_default=False,
        help=(
            "Durable consumer created on the stream if absent, never changed: "
            "name:filter[:ack] (ack explicit, all or none). Repeatable; the variable "
            "takes several separated by spaces."
        ),
    ),
]


@click.command("run")
@with_options([*DATABASE_OPTIONS, *NATS_OPTIONS, *RELAY_OPTIONS])
def run_command(**options: Any) -> None:
    """Relay until SIGTERM or SIGINT (the batch in flight is finished first, then exit 0)."""
    settings = settings_from(options)
    run_async(lambda: run_until_signalled(Relay(settings)))


def serve_health(relay: Relay) -> HealthServer | None:
    settings = relay.settings
    if not settings.metrics_port:
        return None
    try:
        server = HealthServer(relay.metrics, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
            f"{exc.strerror or exc}; choose another --metrics-port (0 turns it off)"
        ) from None
    server.start()
    log.info("metrics and health on http://%s:%d/metrics", settings.metrics_host, server.port)
    return server


async def run_until_signalled(relay: Relay) -> None:
    async def stop_on_signal(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if relay_stopping:
                    log.warning("second %s: exiting now", signal.Signals(signum).name)
                    scope.cancel()
                    return
                log.info(
                    "%s: finishing the batch in flight, then stopping", signal.Signals(signum).name
                )
                relay_stopping.append(signum)
                relay.stop()

    relay_stopping: list[int] = []
    server = serve_health(relay)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal, tg.cancel_scope)
            await relay.run()
            tg.cancel_scope.cancel()
    finally:
        if server is not None:
            server.stop()


@click.command("demo")
@click.option("--events", type=int, default=500, show_default=True, help="Events to emit.")
@click.option(
    "--producers", type=int, default=4, show_default=True, help="Concurrent producer connections."
)
def demo_command(events: int, producers: int) -> None:
    """Start embedded servers (unless configured), emit events, watch them arrive."""
    from outbox_relay.demo import run_demo  # noqa: PLC0415 - needs the 'embedded' extra

    run_async(lambda: run_demo(events=events, producers=producers))
