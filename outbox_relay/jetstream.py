"""NATS connection and the JetStream stream: connect, ensure the stream, read it back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from outbox_relay import atomic, fast_ingest
from outbox_relay.config import DurableConsumer, NatsAuth, Settings, format_duration, redact_url
from outbox_relay.errors import (
    ConfigError,
    CredentialsRefusedError,
    OutboxError,
    ServerUnavailableError,
)
from outbox_relay.subjects import subject_matches

log = logging.getLogger(__name__)


_PING_INTERVAL = 3  # seconds
_MAX_OUTSTANDING_PINGS = 2  # so a silent server is given up within about 10 s


async def connect_nats(settings: Settings, *, name: str = "outbox-relay") -> NATS:
    """Connect, or raise :class:`ServerUnavailableError` after ``connect_timeout``.

    Once connected the client reconnects forever on its own: an outage is waited out,
    never turned into an exit.
    """
    shown = ", ".join(redact_url(u) for u in settings.nats_urls)

    # What went wrong last: the initial connect retries quietly until its deadline,
    # so "timed out" alone would hide a refused password or certificate.
    errors: list[str] = []

    # While reconnecting nats-py reports every failed attempt (one a second): the
    # first is news, the rest are summed up every _ERRORS_EVERY seconds.
    quiet = _Throttle(_ERRORS_EVERY)

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)
        if not nc.is_connected and _refusal(errors[-1]):
            refused.cancel()
        # Before the first connect the final error line says it all, once.
        if (nc.is_connected or nc.is_reconnecting) and (repeated := quiet.due()) is not None:
            again = f" ({repeated} more since the last line)" if repeated else ""
            log.warning("NATS error (%s): %s%s", shown, errors[-1], again)

    async def on_disconnected() -> None:
        if not nc.is_closed:  # a close() of ours is no news
            log.warning("NATS disconnected (%s); reconnecting", shown)

    async def on_reconnected() -> None:
        quiet.reset()
        discard_unsent_on_close(nc)
        log.info("NATS reconnected (%s)", shown)

    nc = NATS()
    # A refused credential will not be accepted on a retry: stop at the first.
    refused = anyio.CancelScope()
    try:
        with anyio.fail_after(settings.connect_timeout), refused:
            await nc.connect(
                servers=list(settings.nats_urls),
                name=name,
                connect_timeout=max(1, min(int(settings.connect_timeout), 5)),
                reconnect_time_wait=1,
                max_reconnect_attempts=-1,
                # A link that drops packets without a RST looks alive for ever: an
                # unanswered PING every few seconds makes the client reconnect instead
                # (nats-py's default is one per 2 minutes).
                ping_interval=_PING_INTERVAL,
                max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                **auth_options(settings.nats_auth),
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        await nc.close()
        if not isinstance(exc, TimeoutError):
            errors.append(str(exc) or type(exc).__name__)
        raise _unavailable(shown, settings, errors) from exc
    if refused.cancel_called:
        # Stopped mid-connect: nats-py's close() would skip the socket it opened.
        transport = getattr(nc, "_transport", None)
        await nc.close()
        if transport is not None:
            transport.close()
            with contextlib.suppress(OSError):
                await transport.wait_closed()
        raise _unavailable(shown, settings, errors)
    discard_unsent_on_close(nc)
    return nc


_ERRORS_EVERY = 30.0  # seconds between lines about the same outage's errors


class _Throttle:
    """Lets a line through now and then; counts the ones held back."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._next = 0.0
        self._held = 0

    def due(self) -> int | None:
        """How many were held back since the last line let through, or None: hold."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        held, self._held, self._next = self._held, 0, now + self._every
        return held

    def reset(self) -> None:
        self._next, self._held = 0.0, 0


def discard_unsent_on_close(nc: NATS) -> None:
    """However the connection ends, the kernel drops what it still holds to send and
    resets it (SO_LINGER 0) rather than deliver it later. A frame without its PubAck
    is published again from its row, so dropping it costs nothing; delivered at a
    silent link's heal, it would land late and out of order. nats-py closes a
    connection it finds stale gracefully, which would deliver it."""
    writer = _writer_of(nc)
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is not None:
        # A socket nats-py has closed already (a stale connection) took this setting
        # when it opened: nothing is left to discard.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset_connection(nc: NATS) -> bool:
    """Drop the connection now, with what nats-py and the kernel still hold to send;
    nats-py reconnects. False when the transport is not a socket of ours to reset
    (a WebSocket)."""
    writer = _writer_of(nc)
    if writer is None:
        return False
    # Frames nats-py buffers would otherwise go out on the next connection.
    nc._pending = []
    nc._pending_data_size = 0
    discard_unsent_on_close(nc)
    writer.transport.abort()
    return True


def _writer_of(nc: NATS) -> asyncio.StreamWriter | None:
    """nats-py's TCP (or TLS) stream writer; None for a WebSocket, or before connecting."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    return writer if isinstance(writer, asyncio.StreamWriter) else None


def _unavailable(shown: str, settings: Settings, errors: list[str]) -> ServerUnavailableError:
    # A refusal (credentials, certificate) explains more than the reset after it.
    telling = [e for e in errors if _connect_hint(e) is not _GENERIC_HINT]
    reason = (telling or errors or ["timed out"])[-1]
    if _refusal(reason):
        return CredentialsRefusedError(
            f"NATS at {shown} refused the connection ({reason}): {_connect_hint(reason)}"
        )
    return ServerUnavailableError(
        f"cannot reach NATS at {shown} within {format_duration(settings.connect_timeout)} "
        f"({reason}): {_connect_hint(reason)}"
    )


def _refusal(reason: str) -> bool:
    """The server refused our credentials: no retry will be let in."""
    lowered = reason.lower()
    return "authorization violation" in lowered or "authentication" in lowered


def _connect_hint(reason: str) -> str:
    lowered = reason.lower()
    if "authorization" in lowered or "authentication" in lowered:
        return (
            "check the NATS credentials (--nats-user/--nats-password, --nats-token, "
            "--nats-creds or --nats-nkey-seed)"
        )
    if "certificate" in lowered or "ssl" in lowered or "tls" in lowered:
        return "check --nats-tls-ca, --nats-tls-cert and --nats-tls-key and the URL's host"
    return _GENERIC_HINT


_GENERIC_HINT = (
    "check --nats-url / OUTBOX_NATS_URL and that nats-server runs with JetStream enabled (-js)"
)


def auth_options(auth: NatsAuth) -> dict[str, Any]:
    """nats-py ``connect()`` arguments for ``auth``; a bad key or certificate file is
    a :class:`ConfigError`, not a connection failure."""
    options: dict[str, Any] = {}
    if auth.user:
        options.update(user=auth.user, password=auth.password)
    if auth.token:
        options["token"] = auth.token
    if auth.creds_file:
        options["user_credentials"] = auth.creds_file
    if auth.nkey_seed_file:
        options["nkeys_seed"] = auth.nkey_seed_file
    if auth.uses_tls:
        try:
            context = ssl.create_default_context(cafile=auth.tls_ca_file or None)
            if auth.tls_cert_file:
                context.load_cert_chain(auth.tls_cert_file, auth.tls_key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"NATS TLS files unusable: {exc}") from None
        options["tls"] = context
    return options


def server_version(nc: NATS) -> tuple[int, int, int]:
    """The connected server's version, (0, 0, 0) when it does not parse."""
    version = nc.connected_server_version
    try:
        return version.major, version.minor, version.patch
    except (ValueError, TypeError):  # a development build's version string
        return 0, 0, 0


@dataclass(frozen=True, slots=True)
class BatchSupport:
    """The kinds of batch publish a nats-server (or a stream) takes."""

    fast: bool = False  # fast-ingest batches (2.14)
    atomic: bool = False  # atomic batches (2.12.1)


def batch_support(nc: NATS) -> BatchSupport:
    """What the connected server takes."""
    version = server_version(nc)
    return BatchSupport(fast_ingest.server_supports(version), atomic.server_supports(version))


def stream_batches(config: StreamConfig, nc: NATS) -> BatchSupport:
    """The batches the relay will publish to the stream: those both take."""
    server = batch_support(nc)
    return BatchSupport(
        server.fast and bool(config.allow_batched), server.atomic and bool(config.allow_atomic)
    )


def publish_note(config: StreamConfig, nc: NATS) -> str:
    """How the relay will publish to the stream, and what allowing batches would gain."""
    name = config.name
    server, stream = batch_support(nc), stream_batches(config, nc)
    if stream.fast:
        return (
            f"stream {name} allows fast-ingest batch publish: each claim is one "
            "flow-controlled batch, stored as it arrives"
        )
    if not server.atomic:
        version = ".".join(map(str, server_version(nc)))
        return (
            f"nats-server {version} predates batch publish (atomic 2.12.1, fast-ingest "
            "2.14): one PubAck per message; a newer server would take each claim as one "
            "batch (README: Performance)"
        )
    if server.fast:
        how = "each claim is one atomic batch" if stream.atomic else "one PubAck per message"
        return (
            f"stream {name} does not allow fast-ingest batch publish: {how}. Set "
            "allow_batched: true on it to have each claim stored as it arrives, the "
            "fastest path (README: Performance)"
        )
    if stream.atomic:
        return f"stream {name} allows atomic batch publish: each claim is one batch"
    return (
        f"stream {name} does not allow atomic batch publish: one PubAck per message. Set "
        "allow_atomic: true on it to have each claim stored as one batch with one PubAck, "
        "the faster path (README: Performance)"
    )


@dataclass(frozen=True, slots=True)
class StreamStatus:
    created: bool
    config: StreamConfig
    warnings: list[str] = field(default_factory=list)
    consumers_created: list[str] = field(default_factory=list)

    def describe(self) -> str:
        cfg = self.config
        verb = "created" if self.created else "using existing"
        storage = getattr(cfg.storage, "value", cfg.storage)  # nats-py may leave a str
        consumers = (
            f"; created consumers {', '.join(self.consumers_created)}"
            if self.consumers_created
            else ""
        )
        return (
            f"{verb} stream {cfg.name} (subjects {', '.join(cfg.subjects or [])}, "
            f"{storage} storage, duplicate window {format_duration(cfg.duplicate_window)}, "
            f"max age {format_duration(cfg.max_age or 0) if cfg.max_age else 'unlimited'})"
            f"{consumers}"
        )


class StreamMissingError(OutboxError):
    """``check`` or ``verify`` found no stream to check."""

    exit_code = 5


async def require_stream(js: JetStreamContext, settings: Settings) -> StreamInfo:
    """The stream's info, or a one-line error saying why there is none."""
    try:
        return await _stream_info(js, settings)
    except NotFoundError:
        raise StreamMissingError(await _missing_stream(js, settings)) from None


async def _stream_info(js: JetStreamContext, settings: Settings) -> StreamInfo:
    try:
        return await js.stream_info(settings.stream)
    except (ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
        # Nothing answers JetStream's API: not enabled on the server or the account.
        shown = ", ".join(redact_url(u) for u in settings.nats_urls)
        raise ServerUnavailableError(
            f"JetStream is not available at {shown} ({_describe(exc)}): start nats-server "
            "with JetStream enabled (-js) and allow it for this account"
        ) from None


async def _missing_stream(js: JetStreamContext, settings: Settings) -> str:
    """Why the stream is missing: never created, or another stream holds its subjects."""
    try:
        other = await js.find_stream_name_by_subject(f"{settings.subject_prefix}.probe")
    except NotFoundError:
        return (
            f"stream {settings.stream} missing: start `outbox-relay run` once (it creates "
            f"it, bound to {settings.subject_wildcard}) or create it"
        )
    return (
        f"stream {settings.stream} does not exist and another stream binds these subjects: "
        f"{other}; set --stream {other} to use it, or another --subject-prefix"
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{exc.description}, err_code {exc.err_code}"
    return str(exc) or type(exc).__name__


async def ensure_stream(
    js: JetStreamContext, settings: Settings, *, batches: BatchSupport = BatchSupport()
) -> StreamStatus:
    """Create the stream as NoETL's tailer did, or leave an existing one untouched;
    then the configured durable consumers that are absent. ``batches``: what the
    server takes, so a stream we create allows it.

    An existing stream's or consumer's config is the operator's; we only warn where it
    breaks our assumptions.
    """
    try:
        info = await _stream_info(js, settings)
    except NotFoundError:
        config = StreamConfig(
            name=settings.stream,
            subjects=[settings.subject_wildcard],
            storage=StorageType.FILE,
            duplicate_window=settings.duplicate_window,
            max_age=settings.max_age,
            allow_atomic=batches.atomic or None,
            allow_batched=batches.fast or None,
        )
        try:
            info = await js.add_stream(config)
        except BadRequestError:
            # Another relay created it first (with a config of its own), or another
            # stream already binds the subjects.
            try:
                info = await js.stream_info(settings.stream)
            except NotFoundError:
                raise ConfigError(await _missing_stream(js, settings)) from None
        else:
            created, warnings = True, []
    else:
        created, warnings = False, _stream_warnings(info.config, settings)
    made = [
        consumer.name
        for consumer in settings.consumers
        if await _ensure_consumer(js, settings.stream, consumer, warnings)
    ]
    return StreamStatus(created, info.config, warnings, made)


async def _ensure_consumer(
    js: JetStreamContext, stream: str, wanted: DurableConsumer, warnings: list[str]
) -> bool:
    """Create ``wanted`` if absent (True); an existing one is left as it is."""
    try:
        info = await js.consumer_info(stream, wanted.name)
    except NotFoundError:
        config = ConsumerConfig(
            durable_name=wanted.name,
            filter_subject=wanted.filter_subject,
            ack_policy=AckPolicy(wanted.ack_policy),
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            await js.add_consumer(stream, config)
        except BadRequestError:
            # Another relay created it first.
            info = await js.consumer_info(stream, wanted.name)
        else:
            return True
    have = info.config
    if have.filter_subject != wanted.filter_subject or have.ack_policy != AckPolicy(
        wanted.ack_policy
    ):
        warnings.append(
            f"consumer {wanted.name} on stream {stream} exists with filter "
            f"{have.filter_subject}, ack {getattr(have.ack_policy, 'value', have.ack_policy)}, "
            f"not {wanted.filter_subject}, ack {wanted.ack_policy}: left as it is"
        )
    return False


def _stream_warnings(config: StreamConfig, settings: Settings) -> list[str]:
    warnings = []
    if config.duplicate_window < settings.duplicate_window:
        warnings.append(
            f"stream {config.name} has a duplicate window of "
            f"{format_duration(config.duplicate_window)}, shorter than the configured "
            f"{format_duration(settings.duplicate_window)}: a re-publish after a crash may "
            "be stored twice. Raise it with `nats stream edit` or lower --duplicate-window"
        )
    if config.duplicate_window <= settings.claim_hold_bound:
        warnings.append(
            f"stream {config.name}'s duplicate window "
            f"({format_duration(config.duplicate_window)}) is not longer than this relay's "
            f"claim hold bound ({format_duration(settings.claim_hold_bound)}): rows of a relay "
            "frozen mid-batch are published again after that and can be stored twice"
        )
    probe = f"{settings.subject_prefix}.probe"
    if not any(subject_matches(pattern, probe) for pattern in config.subjects or []):
        warnings.append(
            f"stream {config.name} binds {config.subjects}, not {settings.subject_wildcard}: "
            "messages under that prefix will be dead-lettered as unroutable"
        )
    return warnings


async def read_stream(
    js: JetStreamContext, stream: str, *, subject: str = ">", fetch_wait: float = 5.0
) -> list[Msg]:
    """Every message the stream holds on ``subject``, in stream order."""
    return [
        message
        async for batch in read_stream_batches(js, stream, subject=subject, fetch_wait=fetch_wait)
        for message in batch
    ]


async def read_stream_batches(
    js: JetStreamContext, stream: str, *, subject: str = ">", fetch_wait: float = 5.0
) -> AsyncIterator[list[Msg]]:
    """The messages the stream holds on ``subject``, in stream order, a batch at a
    time, so a reader keeps what it needs of each and no more.

    A read the server stops answering before the end raises
    :class:`ServerUnavailableError`: a reader judging the stream must not take what it
    got for all there is.
    """
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=60.0,
        ),
    )
    read, pending = 0, info.state.messages
    try:
        while True:
            try:
                batch = await sub.fetch(1000, timeout=fetch_wait)
            except TimeoutError:
                if read == 0 and await _nothing_on(sub):
                    return  # the stream's messages are all on other subjects
                raise ServerUnavailableError(
                    f"reading stream {stream} stopped after {read:,} messages, about "
                    f"{pending:,} still to come: nats-server sent nothing for "
                    f"{format_duration(fetch_wait)}; nothing was judged, run it again"
                ) from None
            read += len(batch)
            pending = batch[-1].metadata.num_pending
            yield batch
            if pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def _nothing_on(sub: JetStreamContext.PullSubscription) -> bool:
    """Whether the subscription's subject has no message at all (False: no answer)."""
    try:
        return (await sub.consumer_info()).num_pending == 0
    except TimeoutError:
        return False
