"""Inspection commands: lag, check, verify."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import click
import orjson

from outbox_relay.cli.options import (
    DATABASE_OPTIONS,
    NATS_OPTIONS,
    ORDERING_KEY_OPTIONS,
    WINDOW_OPTIONS,
    duration,
    event_window,
    run_async,
    settings_from,
    with_options,
)
from outbox_relay.config import (
    Settings,
    format_duration,
)
from outbox_relay.database import connect_postgres
from outbox_relay.errors import OutboxError
from outbox_relay.jetstream import connect_nats, publish_note, require_stream
from outbox_relay.producer import max_payload_from_env
from outbox_relay.schema import ensure_migrated, latest_version, require_writable
from outbox_relay.store import Lag, OutboxStore, RetryPolicy
from outbox_relay.verify import PROBLEMS, Report, VerificationFailed, verify


@click.command("lag")
@with_options(DATABASE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--max-age",
    "max_age",
    callback=duration,
    help="Exit 5 when the oldest pending row is older (a probe or cron check).",
)
@click.option("--max-pending", type=int, help="Exit 5 when more rows than this are pending.")
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option(
    "--interval",
    callback=duration,
    default="2s",
    show_default=True,
    help="Refresh interval of --watch.",
)
def lag_command(
    as_json: bool,
    max_age: float | None,
    max_pending: int | None,
    watch: bool,
    interval: float,
    **options: Any,
) -> None:
    """Show pending rows, the oldest pending row's age and the dead letters."""
    settings = settings_from(options)
    limits = LagLimits(max_age, max_pending)
    if watch and interval <= 0:
        raise click.BadParameter("must be positive, e.g. 2s", param_hint="--interval")
    if watch:
        with contextlib.suppress(KeyboardInterrupt):
            run_async(lambda: watch_lag(settings, limits, interval, as_json=as_json))
        return
    lag = run_async(lambda: read_lag(settings))
    click.echo(format_lag(lag, limits, as_json=as_json))
    if problems := limits.exceeded(lag):
        raise ThresholdExceeded("; ".join(problems))


class ThresholdExceeded(OutboxError):
    """The outbox is further behind than the operator allows."""

    exit_code = 5


@dataclass(frozen=True, slots=True)
class LagLimits:
    max_age: float | None = None
    max_pending: int | None = None

    def exceeded(self, lag: Lag) -> list[str]:
        problems = []
        if self.max_age is not None and lag.oldest_age_seconds > self.max_age:
            problems.append(
                f"oldest pending row is {lag.oldest_age_seconds:.1f}s old, over --max-age "
                f"{format_duration(self.max_age)}"
            )
        if self.max_pending is not None and lag.pending > self.max_pending:
            problems.append(f"{lag.pending} rows pending, over --max-pending {self.max_pending}")
        return problems


def format_lag(lag: Lag, limits: LagLimits, *, as_json: bool) -> str:
    if as_json:
        return orjson.dumps(lag.as_dict()).decode()
    lines = [
        f"{'pending':<20}{lag.pending}",
        f"{'oldest age (s)':<20}{lag.oldest_age_seconds:.3f}",
        f"{'dead letters':<20}{lag.dead_letters}",
        f"{'held by them':<20}{lag.held}",
    ]
    lines += [f"over limit: {problem}" for problem in limits.exceeded(lag)]
    return "\n".join(lines)


async def read_lag(settings: Settings) -> Lag:
    async with await connect_postgres(settings, autocommit=True) as conn:
        await ensure_migrated(conn, settings.names)
        return await OutboxStore(settings.names, RetryPolicy()).lag(conn)


async def watch_lag(
    settings: Settings, limits: LagLimits, interval: float, *, as_json: bool
) -> None:
    """Print the lag every ``interval``: in place on a terminal, a line at a time otherwise."""
    in_place = sys.stdout.isatty() and not as_json
    store = OutboxStore(settings.names, RetryPolicy())
    async with await connect_postgres(settings, autocommit=True) as conn:
        await ensure_migrated(conn, settings.names)
        while True:
            shown = format_lag(await store.lag(conn), limits, as_json=as_json)
            if in_place:
                click.echo(f"\x1b[H\x1b[2J{datetime.now():%H:%M:%S}  outbox {settings.schema}")
            click.echo(shown)
            await anyio.sleep(interval)


@click.command("check")
@with_options([*DATABASE_OPTIONS, *NATS_OPTIONS])
def check_command(**options: Any) -> None:
    """Check both servers, the schema and the stream; exit non-zero on any problem."""
    settings = settings_from(options)

    async def go() -> None:
        async with await connect_postgres(settings, autocommit=True) as conn:
            await require_writable(
                conn,
                settings.names,
                "relays would wait there for a primary; point --database-url at the primary",
            )
            await ensure_migrated(conn, settings.names)
            store = OutboxStore(settings.names, RetryPolicy())
            health = await store.table_health(conn)
            squatters = await store.partition_squatters(conn)
        click.echo(f"postgres: ok, schema {settings.schema} at version {latest_version()}")
        click.echo(
            f"outbox table: {health.size_bytes / 2**20:,.1f} MiB; about {health.live_rows:,} "
            f"live and {health.dead_rows:,} dead rows by PostgreSQL's statistics (`lag` "
            "counts the pending rows)"
        )
        if warning := health.bloat_warning():
            click.echo(f"warning: {warning}", err=True)
        nc = await connect_nats(settings, name="outbox-relay check")
        try:
            info = await require_stream(nc.jetstream(), settings)
            server_max = nc.max_payload
            batches_note = publish_note(info.config, nc)
        finally:
            await nc.close()
        click.echo(f"nats: ok, stream {settings.stream} holds {info.state.messages} messages")
        click.echo(f"nats max_payload: {server_max:,} bytes, headers included")
        click.echo(f"nats publish: {batches_note}")
        if (producer_max := max_payload_from_env()) > server_max:
            click.echo(
                f"warning: the producers' maximum of {producer_max:,} bytes "
                f"(OUTBOX_MAX_PAYLOAD) is above the server's max_payload of {server_max:,}: "
                "larger messages would be accepted, then dead-lettered; lower it",
                err=True,
            )
        if squatters:
            pids = ", ".join(str(s.pid) for s in squatters)
            raise OutboxError(
                "; ".join(s.describe() for s in squatters)
                + f": their keys' rows wait. End them: SELECT pg_terminate_backend(pid) for {pids}"
            )

    run_async(go)


@click.command("verify")
@with_options([*DATABASE_OPTIONS, *NATS_OPTIONS, *ORDERING_KEY_OPTIONS, *WINDOW_OPTIONS])
@click.option(
    "--strict-order",
    is_flag=True,
    help="Each key's events were written one transaction at a time (one writer per "
    "execution): check each key's messages against event id order as well as the "
    "relay's sequence numbers. Leave it off for keys written concurrently, whose "
    "order is commit order.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_command(strict_order: bool, as_json: bool, **options: Any) -> None:
    """Check every event of a window: ok, pending, lost, duplicate, unexpected, out of
    order, unkeyed, collided, or rolled back by a failover after it was published.

    Exits 5 when anything is lost, duplicated, unexpected, out of order, unkeyed,
    collided or rolled back; 3 when the stream cannot be read to its end.
    """
    window = event_window(options)
    settings = settings_from(options)

    async def go() -> Report:
        async with await connect_postgres(settings, autocommit=True) as conn:
            await ensure_migrated(conn, settings.names)
            nc = await connect_nats(settings, name="outbox-relay verify")
            try:
                await require_stream(nc.jetstream(), settings)
                return await verify(
                    conn, nc.jetstream(), settings, window, strict_order=strict_order
                )
            finally:
                await nc.close()

    report = run_async(go)
    summary = report.as_dict()
    if as_json:
        click.echo(orjson.dumps(summary).decode())
    else:
        keys = ("ok", "pending", *PROBLEMS)
        width = max(map(len, keys)) + 2
        for key in keys:
            click.echo(f"{key:<{width}}{summary[key]}")
    if not report.clean:
        raise VerificationFailed(
            ", ".join(f"{summary[key]} {key.replace('_', ' ')}" for key in PROBLEMS)
        )
