"""End-to-end latency: from a producer's commit to the message stored in the stream.

Both ends are the servers' own clocks (one host), so nothing in this process can
skew them: the commit time is PostgreSQL's (``track_commit_timestamp``, read as
``pg_xact_commit_timestamp(xmin)`` of each event row), the stored time JetStream's
(each message's timestamp). Producers are pgbench clients committing at a fixed
rate (``-R``, Poisson arrivals), each transaction one event row and its outbox row
through the SQL enqueue function, or several (``--events-per-commit``: the same
event rate from fewer, larger transactions, which costs the machine's two cores
far less). Each cell runs one relay in its own process, as in production:

* ``floor``: benchmarks/floor_relay.py, the simplest correct relay (LISTEN, claim
  the visible rows, publish with PubAcks, delete, commit), woken by a NOTIFY per
  inserting statement;
* ``ours``: ``outbox-relay run`` with its shipped idle wake-up;
* ``poll``: ours woken by nothing but a 100 ms poll (not run by default).

Beside every cell's load the benchmark samples the bare parts: commit →
notification received, and one JetStream publish → PubAck. Cells are interleaved
over ``--rounds`` and medians kept; ours is reported as a ratio to the floor::

    .venv/bin/python -m benchmarks.latency --rates 100 500 1000 --rounds 3

PostgreSQL stamps a commit just before it flushes it, so the figures include the
producer's own commit flush; the benchmark measures that gap (stamp → COMMIT
returned to a client) and prints it. An existing server given by
``OUTBOX_DATABASE_URL`` must run with ``track_commit_timestamp = on``; the
embedded one is restarted with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats
import psycopg
from anyio.abc import Process
from nats.aio.msg import Msg
from psycopg import sql

from benchmarks.common import (
    drop_outbox,
    fresh_outbox,
    shipped_trigger,
    start_relay,
    stop_relay,
)
from benchmarks.producer_overhead import producer_script, run_pgbench, set_wakeup
from outbox_relay.config import Settings
from outbox_relay.embedded import EmbeddedNats, EmbeddedPostgres
from outbox_relay.jetstream import batch_support, ensure_stream

CLIENTS = 32  # enough for 10,000 commits/s, each client's own execution (ordering key)
MODES = ("floor", "ours", "poll")
POLL = {"ours": "5s", "poll": "100ms"}
PROBE_INTERVAL = 0.02  # 50 probes a second: enough for a p99 in a cell, little load


def commit_stamping_postgres(stack: ExitStack) -> str:
    """A server that records commit times: ``OUTBOX_DATABASE_URL``'s, or an embedded
    one restarted with ``track_commit_timestamp = on`` (it takes effect at start)."""
    url = os.environ.get("OUTBOX_DATABASE_URL")
    if url:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SHOW track_commit_timestamp").fetchone()
        if row is None or row[0] != "on":
            sys.exit(
                "latency: the server at OUTBOX_DATABASE_URL does not record commit times; "
                "run ALTER SYSTEM SET track_commit_timestamp = on and restart it"
            )
        return url
    server = stack.enter_context(EmbeddedPostgres())
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    server.restart()
    return server.url


def stamp_gap_ms(database_url: str, commits: int = 500) -> list[float]:
    """Commit stamp → COMMIT returned to a client, for each of ``commits`` commits."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Not a temporary table: its commits would skip the WAL flush measured here.
        conn.execute("CREATE TABLE stamp_gap (n int)")
        returned = []
        for n in range(commits):
            with conn.transaction():
                conn.execute("INSERT INTO stamp_gap VALUES (%s)", (n,))
            returned.append(time.time())
        stamps = conn.execute(
            "SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8"
            " FROM stamp_gap ORDER BY n"
        ).fetchall()
        conn.execute("DROP TABLE stamp_gap")
    return sorted((r - s) * 1000 for r, (s,) in zip(returned, stamps, strict=True))


async def commit_times(settings: Settings) -> dict[str, float]:
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT event_id::text, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8"
                " FROM {}"
            ).format(sql.Identifier(settings.schema, "event"))
        )
        return dict(await cur.fetchall())


async def stored_times(settings: Settings, count: int) -> dict[str, float]:
    """Every message's stored time, read back from the stream after the run."""
    stored: dict[str, float] = {}
    done = anyio.Event()

    async def on_message(msg: Msg) -> None:
        stored[(msg.headers or {})["Nats-Msg-Id"]] = msg.metadata.timestamp.timestamp()
        if len(stored) >= count:
            done.set()

    nc = await nats.connect(settings.nats_urls[0])
    try:
        await nc.jetstream().subscribe(
            settings.subject_wildcard, stream=settings.stream, ordered_consumer=True, cb=on_message
        )
        with anyio.fail_after(60):
            await done.wait()
    finally:
        await nc.close()
    return stored


async def stream_holds(settings: Settings, count: int) -> None:
    nc = await nats.connect(settings.nats_urls[0])
    try:
        js = nc.jetstream()
        with anyio.fail_after(30):
            while (await js.stream_info(settings.stream)).state.messages < count:  # noqa: ASYNC110 - polls
                await anyio.sleep(0.05)
    finally:
        await nc.close()


@dataclass
class Probes:
    """The bare parts, sampled beside the load in every cell: commit → notification
    received (PostgreSQL alone) and one JetStream publish → its PubAck (NATS alone)."""

    notify_ms: list[float] = field(default_factory=list)
    puback_ms: list[float] = field(default_factory=list)


async def probe(settings: Settings, probes: Probes, stop: anyio.Event) -> None:
    table = sql.Identifier(settings.schema, "latency_probe")
    channel = f"{settings.schema}.probe"
    received: dict[int, float] = {}
    async with (
        await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as listen,
        await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as send,
    ):
        await send.execute(sql.SQL("CREATE TABLE {} (n int)").format(table))
        await listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        nc = await nats.connect(settings.nats_urls[0])
        js = nc.jetstream()
        await js.add_stream(name=f"{settings.stream}_probe", subjects=[f"{settings.stream}_probe"])

        async def hear() -> None:
            async for note in listen.notifies():
                received[int(note.payload)] = time.time()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hear)
            n = 0
            while not stop.is_set():
                async with send.transaction():
                    await send.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), (n,))
                    await send.execute("SELECT pg_notify(%s, %s)", (channel, str(n)))
                n += 1
                started = time.perf_counter()
                await js.publish(f"{settings.stream}_probe", b"{}")
                probes.puback_ms.append((time.perf_counter() - started) * 1000)
                await anyio.sleep(PROBE_INTERVAL)
            await anyio.sleep(0.2)  # the last notifications in flight
            tg.cancel_scope.cancel()
        await js.delete_stream(f"{settings.stream}_probe")
        await nc.close()
        cur = await send.execute(
            sql.SQL(
                "SELECT n, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM {}"
            ).format(table)
        )
        for n, stamp in await cur.fetchall():
            if n in received:
                probes.notify_ms.append((received[n] - stamp) * 1000)


async def start_floor(settings: Settings) -> Process:
    """The floor relay in its own process, on a stream made as ours would make it."""
    nc = await nats.connect(settings.nats_urls[0])
    try:
        await ensure_stream(nc.jetstream(), settings, batches=batch_support(nc))
    finally:
        await nc.close()
    return await anyio.open_process(
        [
            sys.executable,
            "-m",
            "benchmarks.floor_relay",
            settings.database_url,
            settings.nats_urls[0],
            settings.schema,
            settings.names.channel,
        ]
    )


async def measure(
    settings: Settings, mode: str, rate: int, per_commit: int, *, seconds: int, script: Path
) -> tuple[dict[str, float], Probes]:
    if mode == "floor":
        relay = await start_floor(settings)
    else:
        relay = await start_relay(settings, OUTBOX_POLL_INTERVAL=POLL[mode])
    probes = Probes()
    try:
        await anyio.sleep(2)  # started (the stream created) and idle
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe, settings, probes, stop)
            await run_pgbench(settings, CLIENTS, seconds, script, rate=rate // per_commit)
            stop.set()
        committed = await commit_times(settings)
        await stream_holds(settings, len(committed))
    finally:
        await stop_relay(relay)
    stored = await stored_times(settings, len(committed))
    latencies = sorted((stored[i] - t) * 1000 for i, t in committed.items())
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "achieved_rate": len(committed) / (max(committed.values()) - min(committed.values())),
        "events": len(committed),
        "p50_ms": cuts[49],
        "p99_ms": cuts[98],
        "max_ms": latencies[-1],
    }, probes


async def set_notify(settings: Settings, mode: str, ours: str) -> None:
    """Our idle wake-up for ours, a NOTIFY per statement for the floor (the simplest
    trigger), none for poll-only."""
    wakeup = {"ours": "ours", "floor": "every", "poll": "none"}[mode]
    await set_wakeup(settings, wakeup, ours)


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1]


async def main(
    rates: list[int], seconds: int, events_per_commit: list[int], modes: list[str], rounds: int
) -> list[dict[str, float | str]]:
    script = Path(tempfile.mkdtemp()) / "producer.sql"
    with ExitStack() as stack:
        database_url = commit_stamping_postgres(stack)
        nats_url = os.environ.get("OUTBOX_NATS_URL") or stack.enter_context(EmbeddedNats()).url
        gap = stamp_gap_ms(database_url)
        print(
            f"commit → stored latency, {seconds}s per cell, {CLIENTS} pgbench clients, "
            f"{rounds} round(s) interleaved, medians; commit stamp → COMMIT returned: "
            f"p50 {gap[len(gap) // 2]:.2f} ms, p99 {gap[len(gap) * 99 // 100]:.2f} ms "
            "(included below)"
        )
        print(
            f"{'mode':<8}{'rate':>7}{'/commit':>8}{'achieved':>10}{'events':>9}"
            f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p50 ÷ floor':>13}{'p99 ÷ floor':>13}"
        )
        rows: list[dict[str, float | str]] = []
        for rate in rates:
            for per_commit in events_per_commit:
                samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
                probes = Probes()
                for _ in range(rounds):
                    for mode in modes:
                        settings = await fresh_outbox(database_url, nats_url)
                        script.write_text(producer_script(settings, per_commit))
                        await set_notify(settings, mode, await shipped_trigger(settings))
                        r, p = await measure(
                            settings, mode, rate, per_commit, seconds=seconds, script=script
                        )
                        await drop_outbox(settings)
                        samples[mode].append(r)
                        probes.notify_ms += p.notify_ms
                        probes.puback_ms += p.puback_ms
                medians = {
                    mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    for mode, runs in samples.items()
                }
                floor = medians.get("floor")
                for mode, r in medians.items():
                    ratios = "".join(
                        f"{r[k] / floor[k]:>13.2f}" for k in ("p50_ms", "p99_ms") if floor
                    )
                    print(
                        f"{mode:<8}{rate:>7}{per_commit:>8}{r['achieved_rate']:>10.0f}"
                        f"{r['events']:>9.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                        f"{r['max_ms']:>9.1f}{ratios}"
                    )
                    rows.append({"mode": mode, "rate": rate, "per_commit": per_commit, **r})
                print(
                    f"{'':<8}bare parts under this load: commit → notification p50 "
                    f"{percentile(probes.notify_ms, 50):.2f} / p99 "
                    f"{percentile(probes.notify_ms, 99):.2f} ms; publish → PubAck p50 "
                    f"{percentile(probes.puback_ms, 50):.2f} / p99 "
                    f"{percentile(probes.puback_ms, 99):.2f} ms"
                )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=["floor", "ours"],
        help="floor: benchmarks/floor_relay.py; ours: outbox-relay run; poll: ours, "
        "poll-only every 100 ms",
    )
    parser.add_argument(
        "--events-per-commit",
        type=int,
        nargs="+",
        default=[1],
        help="events each producer transaction commits (the rate counts events)",
    )
    args = parser.parse_args()
    anyio.run(main, args.rates, args.seconds, args.events_per_commit, args.modes, args.rounds)
