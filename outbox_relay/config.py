"""Relay settings: one validated, immutable object, plus helpers to show them safely."""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbox_relay.errors import ConfigError, InvalidSubjectError
from outbox_relay.queries import Names
from outbox_relay.subjects import subject_matches, validate_filter, validate_subject

DEFAULT_STREAM = "noetl_events"
DEFAULT_SUBJECT_PREFIX = "noetl.events"
DEFAULT_SCHEMA = "noetl"
# The event column whose value keys an event's delivery order (README: Ordering).
DEFAULT_ORDERING_KEY = "execution_id"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# NATS's default max_payload; the producer refuses larger payloads before commit.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# Rows per claim: larger claims spread its statements, and the wait for the stream's
# answer, over more rows (benchmarks/README.md: 2,000 drained 1.12-1.22x faster than 500).
DEFAULT_BATCH_SIZE = 2000
# Payload bytes a batch holds at most: keeps the relay's peak RSS under 200 MiB with
# 1 MiB payloads (benchmarks/memory.py).
DEFAULT_BATCH_MAX_BYTES = 16 * 1024 * 1024
# A container's probes and scrapes come from outside it.
DEFAULT_METRICS_HOST = "0.0.0.0"  # noqa: S104
DEFAULT_METRICS_PORT = 9464

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# JetStream stream names: no white space, no '.', '*', '>', path separators.
_STREAM_NAME = re.compile(r"^[^\s.*>/\\\x00-\x1f]{1,255}$")


def parse_duration(text: str | float) -> float:
    """Seconds from ``"120"``, ``"120s"``, ``"2m"``, ``"24h"``, ``"500ms"``."""
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(
            f"invalid duration {text!r}: use a number of seconds or a number with "
            "ms, s, m, h or d, e.g. 120s, 2m, 24h"
        )
    return float(match[1]) * _DURATION_UNITS[match[2] or "s"]


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


ACK_POLICIES = ("explicit", "all", "none")


@dataclass(frozen=True, slots=True)
class DurableConsumer:
    """A durable pull consumer on the stream: created if absent, never changed."""

    name: str
    filter_subject: str
    ack_policy: str = "explicit"

    def __post_init__(self) -> None:
        # JetStream's rules for consumer names are those for stream names.
        _require(
            bool(_STREAM_NAME.match(self.name)),
            f"invalid consumer name {self.name!r}: no spaces, '.', '*', '>' or slashes",
        )
        _require(
            self.ack_policy in ACK_POLICIES,
            f"consumer {self.name}: ack policy must be explicit, all or none, "
            f"not {self.ack_policy!r}",
        )
        try:
            validate_filter(self.filter_subject)
        except InvalidSubjectError as exc:
            raise ConfigError(f"consumer {self.name}: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> DurableConsumer:
        """``name:filter`` or ``name:filter:ack``, e.g. ``noetl_projector:noetl.events.>``."""
        parts = text.split(":")
        _require(
            len(parts) in (2, 3),
            f"invalid consumer {text!r}: use name:filter[:ack], "
            "e.g. noetl_projector:noetl.events.>:explicit",
        )
        return cls(*parts)


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How the relay proves who it is to NATS, and checks who NATS is (TLS).

    At most one of user/password, token, creds file and nkey seed file; TLS combines
    with any. Empty means unused. Secrets stay out of ``repr()``.
    """

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    creds_file: str = ""
    nkey_seed_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __post_init__(self) -> None:
        methods = [
            name
            for name, used in (
                ("user/password", self.user or self.password),
                ("token", self.token),
                ("creds file", self.creds_file),
                ("nkey seed file", self.nkey_seed_file),
            )
            if used
        ]
        _require(
            len(methods) <= 1,
            f"NATS auth: choose one of {' and '.join(methods)}, not several",
        )
        _require(
            bool(self.user) == bool(self.password),
            "NATS auth: --nats-user and --nats-password go together",
        )
        _require(
            bool(self.tls_cert_file) == bool(self.tls_key_file),
            "NATS TLS: --nats-tls-cert and --nats-tls-key go together",
        )
        for flag, path in (
            ("--nats-creds", self.creds_file),
            ("--nats-nkey-seed", self.nkey_seed_file),
            ("--nats-tls-ca", self.tls_ca_file),
            ("--nats-tls-cert", self.tls_cert_file),
            ("--nats-tls-key", self.tls_key_file),
        ):
            _require(not path or os.path.isfile(path), f"{flag}: no such file {path!r}")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the relay needs. Construct it directly or through the CLI."""

    # May hold a password: kept out of repr() so it cannot end up in a log.
    database_url: str = field(default="", repr=False)  # empty: libpq's PG* variables
    nats_urls: tuple[str, ...] = (DEFAULT_NATS_URL,)
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    schema: str = DEFAULT_SCHEMA
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES
    poll_interval: float = 5.0
    max_attempts: int = 10
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    duplicate_window: float = 120.0
    max_age: float = 24 * 3600.0
    publish_timeout: float = 10.0
    connect_timeout: float = 10.0
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    # Where `outbox-relay run` serves /metrics, /healthz and /readyz (port 0: nowhere).
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_port: int = DEFAULT_METRICS_PORT
    lag_interval: float = 10.0
    # Keyed rows one relay at a time, in commit order (README: Ordering).
    ordered: bool = True
    # A dead-lettered keyed row: "hold" its key's later rows, or "skip" past it.
    dead_letter_policy: str = "hold"
    # Publish a batch only once a streaming standby has flushed it (README: Guarantees).
    standby_confirmed: bool = False
    # The event column that keys events, as producers key them (OUTBOX_ORDERING_KEY):
    # replay keys its rows by it, verify expects it on every event message.
    ordering_key: str | None = DEFAULT_ORDERING_KEY
    # Durable consumers the relay creates on the stream if absent.
    consumers: tuple[DurableConsumer, ...] = ()
    names: Names = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", Names(self.schema))
        if not self.nats_urls or not all(u.strip() for u in self.nats_urls):
            raise ConfigError("the NATS URL list is empty: set --nats-url or OUTBOX_NATS_URL")
        for url in self.nats_urls:
            if problem := _nats_url_problem(url):
                raise ConfigError(f"invalid NATS URL {redact_url(url)!r}: {problem}")
        # Bytes, too: the producer reserves room for the longest name in its headers.
        if not _STREAM_NAME.match(self.stream) or len(self.stream.encode()) > 255:
            raise ConfigError(
                f"invalid stream name {self.stream!r}: no spaces, '.', '*', '>' or slashes"
            )
        try:
            validate_subject(self.subject_prefix)
        except InvalidSubjectError as exc:
            raise ConfigError(f"subject prefix: {exc}") from None
        _require(1 <= self.batch_size <= 10_000, "batch size must be between 1 and 10000")
        _require(self.batch_max_bytes >= 1, "batch max bytes must be at least 1")
        _require(self.max_attempts >= 1, "max attempts must be at least 1")
        _require(0 <= self.metrics_port <= 65535, "metrics port must be between 0 and 65535")
        _require(self.ordering_key != "", "ordering key must be a column name, or None")
        _require(
            self.dead_letter_policy in {"hold", "skip"},
            f"dead letter policy must be hold or skip, not {self.dead_letter_policy!r}",
        )
        for name in (
            "poll_interval",
            "retry_backoff",
            "publish_timeout",
            "connect_timeout",
            "lag_interval",
        ):
            _require(getattr(self, name) > 0, f"{name.replace('_', ' ')} must be positive")
        _require(
            self.retry_backoff_max >= self.retry_backoff,
            "retry backoff max must be at least the retry backoff",
        )
        _require(self.duplicate_window > 0, "duplicate window must be positive")
        _require(self.max_age >= 0, "max age must be zero (unlimited) or positive")
        _require(
            self.max_age == 0 or self.duplicate_window <= self.max_age,
            "duplicate window must not exceed max age",
        )
        for consumer in self.consumers:
            probe = consumer.filter_subject.replace(">", "x").replace("*", "x")
            _require(
                subject_matches(self.subject_wildcard, probe),
                f"consumer {consumer.name}'s filter {consumer.filter_subject} is outside the "
                f"stream's subjects ({self.subject_wildcard})",
            )
        _require(
            self.duplicate_window > self.claim_hold_bound,
            f"duplicate window must be longer than the claim hold bound, 2 x publish "
            f"timeout + 5s = {format_duration(self.claim_hold_bound)}: rows a frozen relay "
            "held are published again after that",
        )

    @property
    def claim_hold_bound(self) -> float:
        """Longest a relay keeps claimed rows locked: the publish wait, with a margin.

        PostgreSQL ends a session idle in its transaction this long, releasing a
        frozen relay's rows; they may then be published again, so the duplicate
        window has to be longer than this.
        """
        return 2 * self.publish_timeout + 5.0

    @property
    def subject_wildcard(self) -> str:
        """What the stream binds: every subject under the prefix."""
        return f"{self.subject_prefix}.>"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def split_nats_urls(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _nats_url_problem(url: str) -> str | None:
    """What is wrong with a NATS URL, in words (None: nothing nats-py would trip on)."""
    if any(c.isspace() or c == ";" for c in url):
        return "separate several URLs with commas, nothing else"
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme not in {"nats", "tls", "ws", "wss"} or not parts.hostname:
        return "expected nats://host:port"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "the port must be a number from 1 to 65535"
    return None


def redact_url(url: str) -> str:
    """The URL with any password or token replaced, safe to log."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # as written: even a port that is no number
    user = f"{parts.username}:***@" if parts.password is not None else "***@"
    return urlunsplit(parts._replace(netloc=user + host))


def describe_database(conninfo: str) -> str:
    """``user@host:port/dbname`` of a libpq connection string or URL, without secrets."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:  # malformed: connect() reports it in detail
        return "<unparsable connection string>"

    def param(key: str, env: str) -> str:
        return str(params.get(key) or os.environ.get(env, ""))

    # libpq's defaults when nothing says otherwise: the local socket, the login
    # name, a database named after the user. Shown as such, not as "localhost".
    port = param("port", "PGPORT")
    if host := param("host", "PGHOST"):
        where = f"{host}:{port}" if port else host
    else:
        where = f"local socket .s.PGSQL.{port or 5432}"
    user = param("user", "PGUSER") or getpass.getuser()
    dbname = param("dbname", "PGDATABASE") or user
    return f"{user}@{where}/{dbname}"
