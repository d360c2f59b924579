"""The ``outbox-relay`` command line.

Every option has an environment variable; user mistakes end in one line on stderr
and a non-zero exit code (2 usage/config, 3 server unreachable, 4 not migrated).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
import click
import orjson
import psycopg

from outbox_relay import config
from outbox_relay.config import (
    DEFAULT_BATCH_SIZE,
    DurableConsumer,
    NatsAuth,
    Settings,
    format_duration,
    parse_duration,
    split_nats_urls,
)
from outbox_relay.database import connect_postgres, connected_to
from outbox_relay.dead_letters import (
    DeadLetterFilter,
    list_dead_letters,
    purge_dead_letters,
    retry_dead_letters,
    show_dead_letter,
)
from outbox_relay.errors import ConfigError, InvalidSubjectError, OutboxError
from outbox_relay.jetstream import connect_nats, publish_note, require_stream
from outbox_relay.logs import LogFormat, configure_logging
from outbox_relay.metrics import HealthServer
from outbox_relay.producer import max_payload_from_env
from outbox_relay.queries import ROLE_PURPOSES
from outbox_relay.relay import Relay
from outbox_relay.replay import ReplaySelection, replay
from outbox_relay.schema import ensure_migrated, grant_roles, latest_version, migrate
from outbox_relay.store import Lag, OutboxStore, RetryPolicy
from outbox_relay.subjects import validate_subject
from outbox_relay.verify import PROBLEMS, Report, VerificationFailed, Window, verify

log = logging.getLogger("outbox_relay")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:  # an optional duration left out
        return None
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _option(*decls: str, envvar: str, **kwargs: Any) -> Callable[[F], F]:
    kwargs.setdefault("show_default", True)
    return click.option(*decls, envvar=envvar, show_envvar=True, **kwargs)


# One declaration per setting: the flag, its environment variable, default and help.
DATABASE_OPTIONS = [
    _option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        default="",
        help="libpq URL or key=value string; empty uses the PG* variables.",
        show_default=False,
    ),
    _option(
        "--schema",
        envvar="OUTBOX_SCHEMA",
        default=config.DEFAULT_SCHEMA,
        help="Schema of the event, outbox and dead-letter tables.",
    ),
]
NATS_OPTIONS = [
    _option(
        "--nats-url",
        envvar="OUTBOX_NATS_URL",
        default=config.DEFAULT_NATS_URL,
        help="NATS server URLs, comma-separated.",
    ),
    _option(
        "--stream",
        envvar="OUTBOX_STREAM",
        default=config.DEFAULT_STREAM,
        help="JetStream stream to publish to (created if absent).",
    ),
    _option(
        "--subject-prefix",
        envvar="OUTBOX_SUBJECT_PREFIX",
        default=config.DEFAULT_SUBJECT_PREFIX,
        help="Event subjects are <prefix>.<event_type>; the stream binds <prefix>.>.",
    ),
    _option(
        "--duplicate-window",
        envvar="OUTBOX_DUPLICATE_WINDOW",
        callback=_duration,
        default="120s",
        help="Duplicate window of a stream we create.",
    ),
    _option(
        "--max-age",
        envvar="OUTBOX_MAX_AGE",
        callback=_duration,
        default="24h",
        help="Max age of a stream we create (0: unlimited).",
    ),
    _option("--nats-user", envvar="OUTBOX_NATS_USER", default="", help="NATS user name."),
    _option(
        "--nats-password",
        envvar="OUTBOX_NATS_PASSWORD",
        default="",
        help="NATS password (with --nats-user).",
        show_default=False,
    ),
    _option(
        "--nats-token",
        envvar="OUTBOX_NATS_TOKEN",
        default="",
        help="NATS authentication token.",
        show_default=False,
    ),
    _option(
        "--nats-creds",
        envvar="OUTBOX_NATS_CREDS",
        default="",
        help="NATS credentials file (JWT and nkey seed).",
    ),
    _option(
        "--nats-nkey-seed",
        envvar="OUTBOX_NATS_NKEY_SEED",
        default="",
        help="File holding a NATS nkey seed.",
    ),
    _option(
        "--nats-tls-ca",
        envvar="OUTBOX_NATS_TLS_CA",
        default="",
        help="CA certificate file to verify the NATS server (TLS on).",
    ),
    _option(
        "--nats-tls-cert",
        envvar="OUTBOX_NATS_TLS_CERT",
        default="",
        help="Client certificate file for mutual TLS.",
    ),
    _option(
        "--nats-tls-key",
        envvar="OUTBOX_NATS_TLS_KEY",
        default="",
        help="Client key file for mutual TLS.",
    ),
    _option(
        "--connect-timeout",
        envvar="OUTBOX_CONNECT_TIMEOUT",
        callback=_duration,
        default="10s",
        help="How long start-up waits for each server.",
    ),
]
# The event column that keys events: replay keys its rows by it, verify expects it.
ORDERING_KEY_OPTIONS = [
    _option(
        "--ordering-key",
        envvar="OUTBOX_ORDERING_KEY",
        default=config.DEFAULT_ORDERING_KEY,
        help="Event column that keys each event's delivery order, as producers key it "
        "(empty: events are unkeyed).",
    ),
]
RELAY_OPTIONS = [
    _option(
        "--batch-size",
        envvar="OUTBOX_BATCH_SIZE",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="Rows claimed and published per transaction.",
    ),
    _option(
        "--batch-max-bytes",
        envvar="OUTBOX_BATCH_MAX_BYTES",
        type=click.IntRange(min=1),
        default=config.DEFAULT_BATCH_MAX_BYTES,
        help="Payload bytes per batch at most (a larger row still goes, alone); bounds memory.",
    ),
    _option(
        "--poll-interval",
        envvar="OUTBOX_POLL_INTERVAL",
        callback=_duration,
        default="5s",
        help="Poll this often even without notifications.",
    ),
    _option(
        "--max-attempts",
        envvar="OUTBOX_MAX_ATTEMPTS",
        type=int,
        default=10,
        help="Failed publishes of a row before it is dead-lettered.",
    ),
    _option(
        "--retry-backoff",
        envvar="OUTBOX_RETRY_BACKOFF",
        callback=_duration,
        default="1s",
        help="First delay before a failed row is retried; doubles per attempt.",
    ),
    _option(
        "--retry-backoff-max",
        envvar="OUTBOX_RETRY_BACKOFF_MAX",
        callback=_duration,
        default="5m",
        help="Longest delay between a failed row's attempts.",
    ),
    _option(
        "--publish-timeout",
        envvar="OUTBOX_PUBLISH_TIMEOUT",
        callback=_duration,
        default="10s",
        help="How long a batch waits for its PubAcks.",
    ),
    _option(
        "--ordering/--no-ordering",
        envvar="OUTBOX_ORDERING",
        default=True,
        help="Publish each ordering key's rows one relay at a time, in causal order.",
    ),
    _option(
        "--standby-confirmed/--no-standby-confirmed",
        envvar="OUTBOX_STANDBY_CONFIRMED",
        default=False,
        help="Publish a batch only once a streaming standby has flushed it, so a failover "
        "cannot take back what was published (the role needs pg_monitor).",
    ),
    _option(
        "--dead-letter-policy",
        envvar="OUTBOX_DEAD_LETTER_POLICY",
        type=click.Choice(["hold", "skip"]),
        default="hold",
        help="After a keyed row is dead-lettered: hold its key's later rows, or skip it.",
    ),
    _option(
        "--metrics-host",
        envvar="OUTBOX_METRICS_HOST",
        default=config.DEFAULT_METRICS_HOST,
        help="Address of /metrics, /healthz and /readyz.",
    ),
    _option(
        "--metrics-port",
        envvar="OUTBOX_METRICS_PORT",
        type=int,
        default=config.DEFAULT_METRICS_PORT,
        help="Port of /metrics, /healthz and /readyz (0: not served).",
    ),
    _option(
        "--lag-interval",
        envvar="OUTBOX_LAG_INTERVAL",
        callback=_duration,
        default="10s",
        help="How often the lag gauges and readiness are refreshed.",
    ),
    _option(
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


def _with(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def settings_from(options: dict[str, Any]) -> Settings:
    """Build :class:`Settings` from the parsed CLI options (unknown keys ignored)."""
    known = {
        "database_url",
        "schema",
        "stream",
        "subject_prefix",
        "duplicate_window",
        "max_age",
        "connect_timeout",
        "batch_size",
        "batch_max_bytes",
        "poll_interval",
        "max_attempts",
        "retry_backoff",
        "retry_backoff_max",
        "publish_timeout",
        "metrics_host",
        "metrics_port",
        "lag_interval",
        "dead_letter_policy",
        "standby_confirmed",
    }
    kwargs = {k: v for k, v in options.items() if k in known}
    if "ordering" in options:
        kwargs["ordered"] = options["ordering"]
    if "ordering_key" in options:
        kwargs["ordering_key"] = options["ordering_key"] or None
    if "consumers" in options:
        kwargs["consumers"] = tuple(DurableConsumer.parse(text) for text in options["consumers"])
    if "nats_url" in options:
        kwargs["nats_urls"] = split_nats_urls(options["nats_url"])
        kwargs["nats_auth"] = NatsAuth(
            user=options["nats_user"],
            password=options["nats_password"],
            token=options["nats_token"],
            creds_file=options["nats_creds"],
            nkey_seed_file=options["nats_nkey_seed"],
            tls_ca_file=options["nats_tls_ca"],
            tls_cert_file=options["nats_tls_cert"],
            tls_key_file=options["nats_tls_key"],
        )
    return Settings(**kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    show_default=True,
    help="Least severe level logged.",
)
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    default="auto",
    type=click.Choice(["auto", "json", "text"]),
    show_default=True,
    help="auto: JSON lines unless stderr is a terminal.",
)
@click.version_option(package_name="outbox-relay")
def cli(log_level: str, log_format: LogFormat) -> None:
    """Relay committed PostgreSQL outbox rows to NATS JetStream, exactly once in effect."""
    configure_logging(log_level, log_format)


@cli.command("migrate")
@_with(DATABASE_OPTIONS)
@_option(
    "--create-event-table",
    envvar="OUTBOX_CREATE_EVENT_TABLE",
    is_flag=True,
    default=False,
    help="On a first run without NoETL's event table, create a standalone one.",
)
def migrate_command(create_event_table: bool, **options: Any) -> None:
    """Create or upgrade the outbox schema (idempotent; safe to run from every replica)."""
    settings = settings_from(options)

    async def go() -> None:
        async with await connect_postgres(settings) as conn:
            applied = await migrate(conn, settings.names, create_event_table=create_event_table)
            target = connected_to(conn)
        if applied:
            for migration in applied:
                click.echo(f"applied {migration.version:04d}_{migration.name}")
        click.echo(
            f"schema {settings.schema} is at version {latest_version()} in database {target}"
        )

    _run_async(go)


@cli.command("roles")
@_with(DATABASE_OPTIONS)
def roles_command(**options: Any) -> None:
    """Create least-privilege group roles for producers, relays and operators (sql/roles.sql)."""
    settings = settings_from(options)

    async def go() -> None:
        async with await connect_postgres(settings) as conn:
            roles = await grant_roles(conn, settings.names)
        for purpose, role in zip(ROLE_PURPOSES, roles, strict=True):
            click.echo(f"{purpose:9} {role}")
        click.echo("grant them to login roles: GRANT <role> TO <login>;")

    _run_async(go)


@cli.command("run")
@_with([*DATABASE_OPTIONS, *NATS_OPTIONS, *RELAY_OPTIONS])
def run_command(**options: Any) -> None:
    """Relay until SIGTERM or SIGINT (the batch in flight is finished first, then exit 0)."""
    settings = settings_from(options)
    _run_async(lambda: run_until_signalled(Relay(settings)))


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


@cli.command("lag")
@_with(DATABASE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--max-age",
    "max_age",
    callback=_duration,
    help="Exit 5 when the oldest pending row is older (a probe or cron check).",
)
@click.option("--max-pending", type=int, help="Exit 5 when more rows than this are pending.")
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option(
    "--interval",
    callback=_duration,
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
            _run_async(lambda: watch_lag(settings, limits, interval, as_json=as_json))
        return
    lag = _run_async(lambda: read_lag(settings))
    click.echo(_format_lag(lag, limits, as_json=as_json))
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


def _format_lag(lag: Lag, limits: LagLimits, *, as_json: bool) -> str:
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
            shown = _format_lag(await store.lag(conn), limits, as_json=as_json)
            if in_place:
                click.echo(f"\x1b[H\x1b[2J{datetime.now():%H:%M:%S}  outbox {settings.schema}")
            click.echo(shown)
            await anyio.sleep(interval)


@cli.command("check")
@_with([*DATABASE_OPTIONS, *NATS_OPTIONS])
def check_command(**options: Any) -> None:
    """Check both servers, the schema and the stream; exit non-zero on any problem."""
    settings = settings_from(options)

    async def go() -> None:
        async with await connect_postgres(settings, autocommit=True) as conn:
            await ensure_migrated(conn, settings.names)
            store = OutboxStore(settings.names, RetryPolicy())
            health = await store.table_health(conn)
            squatters = await store.partition_squatters(conn)
        click.echo(f"postgres: ok, schema {settings.schema} at version {latest_version()}")
        click.echo(
            f"outbox table: {health.live_rows:,} live rows, {health.dead_rows:,} dead, "
            f"{health.size_bytes / 2**20:,.1f} MiB"
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

    _run_async(go)


WINDOW_OPTIONS = [
    click.option("--from-id", type=int, help="First event id of the window."),
    click.option("--to-id", type=int, help="Last event id of the window."),
    click.option("--since", help="Window start: ISO time or a duration ago (e.g. 10m)."),
    click.option("--until", help="Window end: ISO time or a duration ago."),
]


def _window_bounds(options: dict[str, Any]) -> tuple[Window, datetime | None, datetime | None]:
    """The id window and the time span of the WINDOW_OPTIONS, taken out of ``options``."""
    from_id, to_id = options.pop("from_id"), options.pop("to_id")
    since, until = options.pop("since"), options.pop("until")
    if (from_id is not None or to_id is not None) and (since or until):
        raise click.UsageError("give an id window (--from-id/--to-id) or a time window, not both")
    if from_id is not None and to_id is not None and from_id > to_id:
        raise click.UsageError(f"--from-id {from_id} is after --to-id {to_id}: the window is empty")
    start, end = _moment(since), _moment(until)
    if start is not None and end is not None and start > end:
        raise click.UsageError(
            f"--since {since} is after --until {until}: the window is empty "
            "(a duration means that long ago)"
        )
    return Window(from_id, to_id), start, end


def _window(options: dict[str, Any]) -> Window:
    """The event-id window of the WINDOW_OPTIONS; a time span becomes the ids minted in it."""
    window, since, until = _window_bounds(options)
    return Window.between(since, until) if since or until else window


@cli.command("verify")
@_with([*DATABASE_OPTIONS, *NATS_OPTIONS, *ORDERING_KEY_OPTIONS, *WINDOW_OPTIONS])
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
    window = _window(options)
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

    report = _run_async(go)
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


@cli.command("replay")
@_with([*DATABASE_OPTIONS, *ORDERING_KEY_OPTIONS, *WINDOW_OPTIONS])
@click.option(
    "--subject-prefix",
    envvar="OUTBOX_SUBJECT_PREFIX",
    default=config.DEFAULT_SUBJECT_PREFIX,
    show_default=True,
    help="Replayed subjects are <prefix>.<event_type>.",
)
@click.option("--execution-id", "execution_ids", type=int, multiple=True, help="Repeatable.")
@click.option("--all", "everything", is_flag=True, help="Every event in the table.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def replay_command(
    subject_prefix: str,
    execution_ids: tuple[int, ...],
    everything: bool,
    dry_run: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Re-enqueue committed events from the event table, with their original event ids.

    Inside the stream's duplicate window a replayed event is collapsed with its first
    copy; use it for a new consumer's backfill or a lost stream.
    """
    window, since, until = _window_bounds(options)
    selection = ReplaySelection(window, execution_ids or None, everything, since, until)
    settings = settings_from(options)
    try:
        validate_subject(subject_prefix)
    except InvalidSubjectError as exc:
        raise ConfigError(f"--subject-prefix: {exc}") from None

    async def go() -> int:
        async with await connect_postgres(settings) as conn:
            await ensure_migrated(conn, settings.names)
            count = await replay(
                conn,
                settings.names,
                subject_prefix,
                selection,
                ordering_key=settings.ordering_key,
                dry_run=dry_run,
            )
            await conn.commit()
            return count

    count = _run_async(go)
    verb = "would replay" if dry_run else "replayed"
    if as_json:
        click.echo(orjson.dumps({verb.replace(" ", "_"): count}).decode())
    else:
        click.echo(f"{verb} {count} events")


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ConfigError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an ISO time nor a duration", param_hint="--since/--until"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@cli.group("dead-letters")
def dead_letters_group() -> None:
    """List, re-queue or purge rows that failed --max-attempts times."""


DEAD_LETTER_FILTERS = [
    click.option("--id", "ids", type=int, multiple=True, help="Dead letter id (repeatable)."),
    click.option("--from-id", type=int, help="Lowest dead letter id."),
    click.option("--to-id", type=int, help="Highest dead letter id."),
    click.option("--reason", help="Case-insensitive part of the reason."),
    click.option("--older-than", callback=_duration, help="Dead-lettered longer ago than this."),
]


def _selection(options: dict[str, Any], everything: bool = False) -> DeadLetterFilter:
    """The dead-letter filter options, taken out of ``options``."""
    return DeadLetterFilter(
        ids=options.pop("ids") or None,
        from_id=options.pop("from_id"),
        to_id=options.pop("to_id"),
        reason=options.pop("reason"),
        older_than=options.pop("older_than"),
        everything=everything,
    )


@dead_letters_group.command("list")
@_with([*DATABASE_OPTIONS, *DEAD_LETTER_FILTERS])
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dead_letters_list(limit: int, as_json: bool, **options: Any) -> None:
    """Show dead letters, oldest first."""
    selection = _selection(options)
    settings = settings_from(options)

    async def go() -> list[dict[str, Any]]:
        async with await connect_postgres(settings, autocommit=True) as conn:
            await ensure_migrated(conn, settings.names)
            return await list_dead_letters(conn, settings.names, selection, limit)

    for row in _run_async(go):
        if as_json:
            click.echo(orjson.dumps(row).decode())
        else:
            click.echo(
                f"{row['id']:>10}  {row['event_id']}  {row['subject']}  "
                f"attempts={row['attempts']}  {row['dead_lettered_at']:%Y-%m-%d %H:%M:%S}  "
                f"{row['reason']}"
            )


@dead_letters_group.command("show")
@_with(DATABASE_OPTIONS)
@click.argument("dead_letter_id", type=int)
def dead_letters_show(dead_letter_id: int, **options: Any) -> None:
    """One dead letter whole, payload and headers included, as JSON."""
    settings = settings_from(options)

    async def go() -> dict[str, Any] | None:
        async with await connect_postgres(settings, autocommit=True) as conn:
            await ensure_migrated(conn, settings.names)
            return await show_dead_letter(conn, settings.names, dead_letter_id)

    row = _run_async(go)
    if row is None:
        raise ConfigError(
            f"no dead letter {dead_letter_id}: `outbox-relay dead-letters list` shows them"
        )
    click.echo(orjson.dumps(row, option=orjson.OPT_INDENT_2).decode())


def _dead_letter_change(
    verb: str, change: Callable[..., Coroutine[Any, Any, int]]
) -> click.Command:
    @click.command(verb)
    @_with([*DATABASE_OPTIONS, *DEAD_LETTER_FILTERS])
    @click.option("--all", "everything", is_flag=True, help="Every dead letter.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def command(everything: bool, as_json: bool, **options: Any) -> None:
        selection = _selection(options, everything)
        settings = settings_from(options)

        async def go() -> int:
            async with await connect_postgres(settings) as conn:
                await ensure_migrated(conn, settings.names)
                count = await change(conn, settings.names, selection)
                await conn.commit()
                return count

        count = _run_async(go)
        if as_json:
            click.echo(orjson.dumps({verb: count}).decode())
        else:
            click.echo(f"{verb}: {count} dead letters")

    return command


dead_letters_group.add_command(_dead_letter_change("retry", retry_dead_letters))
dead_letters_group.add_command(_dead_letter_change("purge", purge_dead_letters))
dead_letters_group.commands["retry"].help = "Move dead letters back into the outbox."
dead_letters_group.commands["purge"].help = "Delete dead letters for good."


@cli.command("demo")
@click.option("--events", type=int, default=500, show_default=True, help="Events to emit.")
@click.option(
    "--producers", type=int, default=4, show_default=True, help="Concurrent producer connections."
)
def demo_command(events: int, producers: int) -> None:
    """Start embedded servers (unless configured), emit events, watch them arrive."""
    from outbox_relay.demo import run_demo  # noqa: PLC0415 - needs the 'embedded' extra

    _run_async(lambda: run_demo(events=events, producers=producers))


@cli.command("config-reference")
def config_reference_command() -> None:
    """Print every option as a Markdown table (the README's copy is checked against it)."""
    click.echo(configuration_reference(), nl=False)


def configuration_reference() -> str:
    """Flags, environment variables, defaults and meanings, from the options themselves."""
    seen: dict[str, tuple[click.Option, list[str]]] = {}
    commands: list[tuple[str, click.Command]] = [("(all)", cli)]
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):
            commands += [(f"{name} {sub}", c) for sub, c in command.commands.items()]
        else:
            commands.append((name, command))
    for name, command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                seen.setdefault(param.opts[0], (param, []))[1].append(name)
    lines = [
        "| flag | environment | default | commands | meaning |",
        "|---|---|---|---|---|",
    ]
    for flag, (option, users) in seen.items():
        default = option.default if option.show_default is not False else None
        shown = f"`{default}`" if default not in (None, "") else "—"
        meaning = (option.help or "").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{flag}` | `{option.envvar}` | {shown} | {', '.join(users)} | {meaning} |")
    return "\n".join(lines) + "\n"


def _run_async(func: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return anyio.run(func)


def main() -> None:
    try:
        try:
            cli.main(standalone_mode=False, prog_name="outbox-relay")
        except BaseExceptionGroup as group:
            # Task groups wrap a start-up error; report the single cause as such.
            raise _sole_cause(group) from group
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:
        # One line, like every other mistake; the usage is one --help away.
        command = exc.ctx.command_path if exc.ctx else "outbox-relay"
        click.echo(
            f"outbox-relay: error: {exc.format_message()} (see `{command} --help`)", err=True
        )
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OutboxError as exc:
        click.echo(f"outbox-relay: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        click.echo(f"outbox-relay: database error: {first_line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _sole_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group
