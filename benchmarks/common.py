"""What every benchmark needs: servers, and an outbox of its own on them."""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import anyio
import nats
import psutil
from anyio.abc import Process
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.embedded import EmbeddedNats, EmbeddedPostgres
from outbox_relay.jetstream import BatchSupport, ensure_stream
from outbox_relay.schema import migrate


def servers(stack: ExitStack) -> tuple[str, str]:
    """``OUTBOX_DATABASE_URL`` / ``OUTBOX_NATS_URL`` when set, else embedded servers."""
    database_url = (
        os.environ.get("OUTBOX_DATABASE_URL") or stack.enter_context(EmbeddedPostgres()).url
    )
    nats_url = os.environ.get("OUTBOX_NATS_URL") or stack.enter_context(EmbeddedNats()).url
    return database_url, nats_url


async def fresh_outbox(database_url: str, nats_url: str) -> Settings:
    """A migrated schema and a stream name nothing else uses."""
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        database_url=database_url,
        nats_urls=(nats_url,),
        schema=f"bench_{suffix}",
        stream=f"bench_{suffix}",
        subject_prefix=f"bench_{suffix}.events",
    )
    async with await connect_postgres(settings) as conn:
        await migrate(conn, settings.names, create_event_table=True)
    return settings


async def drop_outbox(settings: Settings) -> None:
    """Drop a finished cell's schema, so that no autovacuum of it runs beside the next."""
    async with await connect_postgres(settings, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(settings.schema))
        )


async def shipped_trigger(settings: Settings) -> str:
    """Our trigger function's definition, as migrated, to restore between modes."""
    async with await connect_postgres(settings, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_get_functiondef(%s::regproc)",
            (sql.Identifier(settings.schema, "event_outbox_notify").as_string(),),
        )
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def start_relay(
    settings: Settings, *, wrapper: Sequence[str] = (), cwd: str | None = None, **env: str
) -> Process:
    """``outbox-relay run`` as a process of its own, as in production, for ``settings``.

    ``env`` adds or overrides ``OUTBOX_*`` variables, e.g. ``OUTBOX_POLL_INTERVAL``;
    ``wrapper`` prefixes the command (``ip netns exec <name>``); ``cwd``, a checkout
    of another revision, runs that revision's relay.
    """
    configured = {"OUTBOX_LOG_LEVEL": "warning", "OUTBOX_METRICS_PORT": "0"}
    return await anyio.open_process(
        [*wrapper, sys.executable, "-m", "outbox_relay", "run"],
        env={**outbox_env(settings), **configured, **env},
        cwd=cwd,
    )


def outbox_env(settings: Settings) -> dict[str, str]:
    """The environment an ``outbox-relay`` command reads ``settings`` from."""
    return {
        **os.environ,
        "OUTBOX_DATABASE_URL": settings.database_url,
        "OUTBOX_NATS_URL": settings.nats_urls[0],
        "OUTBOX_SCHEMA": settings.schema,
        "OUTBOX_STREAM": settings.stream,
        "OUTBOX_SUBJECT_PREFIX": settings.subject_prefix,
    }


async def stop_relay(process: Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    await process.wait()


async def interleaved_medians(
    modes: Sequence[str], rounds: int, measure: Callable[[str], Awaitable[float]]
) -> dict[str, float]:
    """Each mode measured once per round, modes interleaved, medians kept: the
    machine is noisy, and interleaving spreads its noise over every mode alike."""
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            samples[mode].append(await measure(mode))
    return {mode: statistics.median(values) for mode, values in samples.items()}


@dataclass(frozen=True)
class ProcessDrain:
    rows_per_s: float
    cpu_seconds: float  # the relay process's, user and system, during the drain

    def cpu_per_100k(self, rows: int) -> float:
        return self.cpu_seconds * 100_000 / rows


async def process_drain(
    settings: Settings,
    rows: int,
    fill: Callable[[], Awaitable[None]],
    *,
    stream: BatchSupport | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ProcessDrain:
    """``outbox-relay run`` as the user runs it, timed from the commit of ``fill``
    (which writes ``rows`` rows) until the stream holds every one.

    The relay is started and idle first, so its start-up is not in the figure.
    ``stream`` makes the stream first, allowing just those batches, as an operator's
    existing stream (``BatchSupport()``: none, one PubAck per message); by default the
    relay creates it, allowing every kind the server takes. ``env`` and ``cwd``: as
    :func:`start_relay` takes them.
    """
    nc = await nats.connect(settings.nats_urls[0])
    try:
        js = nc.jetstream()
        if stream is not None:
            await ensure_stream(js, settings, batches=stream)
        relay = await start_relay(settings, cwd=cwd, **(env or {}))
        try:
            while not await _has_stream(js, settings.stream):
                if relay.returncode is not None:
                    # A relay that cannot start (say, fenced by a newer schema) would
                    # otherwise leave this waiting for ever.
                    assert relay.stderr is not None
                    reason = (await relay.stderr.receive()).decode(errors="replace").strip()
                    raise RuntimeError(f"the relay exited {relay.returncode}: {reason}")
                await anyio.sleep(0.05)
            await anyio.sleep(0.5)  # past start-up, asleep on an empty outbox
            process = psutil.Process(relay.pid)
            cpu_before = _cpu(process)
            await fill()
            started = time.perf_counter()
            while (await js.stream_info(settings.stream)).state.messages < rows:  # noqa: ASYNC110 - polls
                await anyio.sleep(0.01)
            elapsed = time.perf_counter() - started
            cpu = _cpu(process) - cpu_before
            held = (await js.stream_info(settings.stream)).state.messages
            assert held == rows, f"stream holds {held} messages for {rows} rows"
        finally:
            await stop_relay(relay)
        await js.delete_stream(settings.stream)
    finally:
        await nc.close()
    return ProcessDrain(rows / elapsed, cpu)


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _has_stream(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True
