"""End-to-end latency: from a producer's commit to the message stored in the stream.

Both ends are the servers' own clocks (one host), so nothing in this process can
skew them: the commit time is PostgreSQL's (``track_commit_timestamp``, read as
``pg_xact_commit_timestamp(xmin)`` of each event row), the stored time JetStream's
(each message's timestamp). Producers are pgbench clients committing at a fixed
rate (``-R``, Poisson arrivals), each transaction one event row and its outbox row
through the SQL enqueue function, or several (``--events-per-commit``: the same
event rate from fewer, larger transactions, which costs the machine's two cores
far less); the relay runs as its own process, as in production. Two wake-ups, side
by side: NOTIFY (ours) and poll-only (no notification, a 100 ms poll)::

    .venv/bin/python -m benchmarks.latency --rates 1000 10000 --events-per-commit 1 10

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
from pathlib import Path

import anyio
import nats
import psycopg
from nats.aio.msg import Msg
from psycopg import sql

from benchmarks.common import (
    drop_outbox,
    fresh_outbox,
    shipped_trigger,
    start_relay,
    stop_relay,
)
from benchmarks.producer_overhead import producer_script, run_pgbench
from outbox_relay.config import Settings
from outbox_relay.embedded import EmbeddedNats, EmbeddedPostgres

CLIENTS = 32  # enough for 10,000 commits/s, each client's own execution (ordering key)
MODES = (("notify (ours)", True, "5s"), ("poll 100ms", False, "100ms"))


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


async def measure(
    settings: Settings, rate: int, per_commit: int, *, seconds: int, poll: str, script: Path
) -> dict[str, float]:
    relay = await start_relay(settings, OUTBOX_POLL_INTERVAL=poll)
    try:
        await anyio.sleep(2)  # started (the stream created) and idle
        await run_pgbench(settings, CLIENTS, seconds, script, rate=rate // per_commit)
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
    }


async def set_notify(settings: Settings, enabled: bool, ours: str) -> None:
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as c:
        if enabled:
            await c.execute(ours.encode())
        else:
            await c.execute(
                sql.SQL(
                    "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql"
                    " AS 'BEGIN RETURN NULL; END'"
                ).format(sql.Identifier(settings.schema, "event_outbox_notify"))
            )


async def main(
    rates: list[int], seconds: int, events_per_commit: list[int]
) -> list[dict[str, float | str]]:
    script = Path(tempfile.mkdtemp()) / "producer.sql"
    with ExitStack() as stack:
        database_url = commit_stamping_postgres(stack)
        nats_url = os.environ.get("OUTBOX_NATS_URL") or stack.enter_context(EmbeddedNats()).url
        gap = stamp_gap_ms(database_url)
        print(
            f"commit → stored latency, {seconds}s per cell, {CLIENTS} pgbench clients; "
            f"commit stamp → COMMIT returned: p50 {gap[len(gap) // 2]:.2f} ms, "
            f"p99 {gap[len(gap) * 99 // 100]:.2f} ms (included below)"
        )
        print(
            f"{'mode':<16}{'rate':>7}{'/commit':>8}{'achieved':>10}{'events':>9}"
            f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        )
        rows: list[dict[str, float | str]] = []
        for rate in rates:
            for per_commit in events_per_commit:
                for mode, notify, poll in MODES:
                    settings = await fresh_outbox(database_url, nats_url)
                    script.write_text(producer_script(settings, per_commit))
                    await set_notify(settings, notify, await shipped_trigger(settings))
                    r = await measure(
                        settings, rate, per_commit, seconds=seconds, poll=poll, script=script
                    )
                    await drop_outbox(settings)
                    print(
                        f"{mode:<16}{rate:>7}{per_commit:>8}{r['achieved_rate']:>10.0f}"
                        f"{r['events']:>9.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                        f"{r['max_ms']:>9.1f}"
                    )
                    rows.append({"mode": mode, "rate": rate, "per_commit": per_commit, **r})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--events-per-commit",
        type=int,
        nargs="+",
        default=[1],
        help="events each producer transaction commits (the rate counts events)",
    )
    args = parser.parse_args()
    anyio.run(main, args.rates, args.seconds, args.events_per_commit)
