"""Option tables several command groups share, and how options become Settings."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
import click

from outbox_relay import config
from outbox_relay.config import (
    DurableConsumer,
    NatsAuth,
    Settings,
    parse_duration,
    split_nats_urls,
)
from outbox_relay.errors import ConfigError
from outbox_relay.verify import Window

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:  # an optional duration left out
        return None
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def option(*decls: str, envvar: str, **kwargs: Any) -> Callable[[F], F]:
    kwargs.setdefault("show_default", True)
    return click.option(*decls, envvar=envvar, show_envvar=True, **kwargs)


# One declaration per setting: the flag, its environment variable, default and help.
DATABASE_OPTIONS = [
    option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        default="",
        help="libpq URL or key=value string; empty uses the PG* variables.",
        show_default=False,
    ),
    option(
        "--schema",
        envvar="OUTBOX_SCHEMA",
        default=config.DEFAULT_SCHEMA,
        help="Schema of the event, outbox and dead-letter tables.",
    ),
]
NATS_OPTIONS = [
    option(
        "--nats-url",
        envvar="OUTBOX_NATS_URL",
        default=config.DEFAULT_NATS_URL,
        help="NATS server URLs, comma-separated.",
    ),
    option(
        "--stream",
        envvar="OUTBOX_STREAM",
        default=config.DEFAULT_STREAM,
        help="JetStream stream to publish to (created if absent).",
    ),
    option(
        "--subject-prefix",
        envvar="OUTBOX_SUBJECT_PREFIX",
        default=config.DEFAULT_SUBJECT_PREFIX,
        help="Event subjects are <prefix>.<event_type>; the stream binds <prefix>.>.",
    ),
    option(
        "--duplicate-window",
        envvar="OUTBOX_DUPLICATE_WINDOW",
        callback=duration,
        default="120s",
        help="Duplicate window of a stream we create.",
    ),
    option(
        "--max-age",
        envvar="OUTBOX_MAX_AGE",
        callback=duration,
        default="24h",
        help="Max age of a stream we create (0: unlimited).",
    ),
    option("--nats-user", envvar="OUTBOX_NATS_USER", default="", help="NATS user name."),
    option(
        "--nats-password",
        envvar="OUTBOX_NATS_PASSWORD",
        default="",
        help="NATS password (with --nats-user).",
        show_default=False,
    ),
    option(
        "--nats-token",
        envvar="OUTBOX_NATS_TOKEN",
        default="",
        help="NATS authentication token.",
        show_default=False,
    ),
    option(
        "--nats-creds",
        envvar="OUTBOX_NATS_CREDS",
        default="",
        help="NATS credentials file (JWT and nkey seed).",
    ),
    option(
        "--nats-nkey-seed",
        envvar="OUTBOX_NATS_NKEY_SEED",
        default="",
        help="File holding a NATS nkey seed.",
    ),
    option(
        "--nats-tls-ca",
        envvar="OUTBOX_NATS_TLS_CA",
        default="",
        help="CA certificate file to verify the NATS server (TLS on).",
    ),
    option(
        "--nats-tls-cert",
        envvar="OUTBOX_NATS_TLS_CERT",
        default="",
        help="Client certificate file for mutual TLS.",
    ),
    option(
        "--nats-tls-key",
        envvar="OUTBOX_NATS_TLS_KEY",
        default="",
        help="Client key file for mutual TLS.",
    ),
    option(
        "--connect-timeout",
        envvar="OUTBOX_CONNECT_TIMEOUT",
        callback=duration,
        default="10s",
        help="How long start-up waits for each server.",
    ),
]
# The event column that keys events: replay keys its rows by it, verify expects it.
ORDERING_KEY_OPTIONS = [
    option(
        "--ordering-key",
        envvar="OUTBOX_ORDERING_KEY",
        default=config.DEFAULT_ORDERING_KEY,
        help="Event column that keys each event's delivery order, as producers key it "
        "(empty: events are unkeyed).",
    ),
]


def with_options(options: list[Callable[[F], F]]) -> Callable[[F], F]:
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


WINDOW_OPTIONS = [
    click.option("--from-id", type=int, help="First event id of the window."),
    click.option("--to-id", type=int, help="Last event id of the window."),
    click.option("--since", help="Window start: ISO time or a duration ago (e.g. 10m)."),
    click.option("--until", help="Window end: ISO time or a duration ago."),
]


def window_bounds(options: dict[str, Any]) -> tuple[Window, datetime | None, datetime | None]:
    """The id window and the time span of the WINDOW_OPTIONS, taken out of ``options``."""
    from_id, to_id = options.pop("from_id"), options.pop("to_id")
    since, until = options.pop("since"), options.pop("until")
    if (from_id is not None or to_id is not None) and (since or until):
        raise click.UsageError("give an id window (--from-id/--to-id) or a time window, not both")
    if from_id is not None and to_id is not None and from_id > to_id:
        raise click.UsageError(f"--from-id {from_id} is after --to-id {to_id}: the window is empty")
    start, end = moment(since), moment(until)
    if start is not None and start > datetime.now(UTC):
        raise click.UsageError(f"--since {since} is in the future: the window is empty")
    if start is not None and end is not None and start > end:
        raise click.UsageError(
            f"--since {since} is after --until {until}: the window is empty "
            "(a duration means that long ago)"
        )
    return Window(from_id, to_id), start, end


def event_window(options: dict[str, Any]) -> Window:
    """The event-id window of the WINDOW_OPTIONS; a time span becomes the ids minted in it."""
    window, since, until = window_bounds(options)
    return Window.between(since, until) if since or until else window


def moment(text: str | None) -> datetime | None:
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


def run_async(func: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return anyio.run(func)
