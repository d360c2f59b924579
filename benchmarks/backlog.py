"""A large backlog: steady drain, bounded memory, no runaway bloat.

Preloads rows, runs the relay as its own process until the outbox is empty, and
reports the drain rate over time, the relay's peak RSS, and the outbox table's size
and dead tuples during and after, then waits (up to 90 s) for autovacuum, with the
table's settings from sql/migrations/0003_outbox_autovacuum.sql::

    .venv/bin/python -m benchmarks.backlog --rows 1000000 --payload 300
"""

from __future__ import annotations

import argparse
import itertools
import time
from contextlib import ExitStack

import anyio
import psutil

from benchmarks.common import fresh_outbox, servers, start_relay, stop_relay
from benchmarks.drain import preload
from outbox_relay.database import connect_postgres
from outbox_relay.store import OutboxStore, RetryPolicy


async def main(rows: int, payload: int, settle: float = 90.0) -> dict[str, float]:
    with ExitStack() as stack:
        settings = await fresh_outbox(*servers(stack))
        store = OutboxStore(settings.names, RetryPolicy())
        await preload(settings, rows, payload)
        async with await connect_postgres(settings, autocommit=True) as conn:
            before = await store.table_health(conn)
            started = time.perf_counter()
            relay = await start_relay(settings, OUTBOX_MAX_AGE="0")
            process = psutil.Process(relay.pid)
            peak_rss, peak_dead, samples = 0, 0, []
            pending = rows
            while pending:
                await anyio.sleep(1)
                peak_rss = max(peak_rss, process.memory_info().rss)
                pending = (await store.lag(conn)).pending
                peak_dead = max(peak_dead, (await store.table_health(conn)).dead_rows)
                samples.append((time.perf_counter() - started, pending))
            elapsed = time.perf_counter() - started
            after = await store.table_health(conn)
            # Keep the relay running (idle) while autovacuum catches up.
            settled = after
            waited = 0.0
            while settled.dead_rows > 10_000 and waited < settle:
                await anyio.sleep(5)
                waited += 5
                settled = await store.table_health(conn)
            await stop_relay(relay)
    print(
        f"backlog {rows:,} rows of {payload} B drained in {elapsed:.1f}s: {rows / elapsed:,.0f}/s"
    )
    for (t0, p0), (t1, p1) in itertools.pairwise(samples):
        if int(t1) % 5 == 0:
            print(f"  t={t1:5.1f}s  pending {p1:>9,}  rate {(p0 - p1) / (t1 - t0):>8,.0f}/s")
    print(f"  relay peak RSS {peak_rss / 2**20:.0f} MiB")
    print(
        f"  outbox table: {before.size_bytes / 2**20:.0f} MiB before; peak {peak_dead:,} dead "
        f"tuples during the drain; {after.size_bytes / 2**20:.0f} MiB and {after.dead_rows:,} "
        f"dead right after; {settled.dead_rows:,} dead {waited:.0f}s later "
        f"(last vacuum {settled.since_vacuum_seconds or 0:.0f}s ago)"
    )
    return {
        "rows": rows,
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
        "relay_peak_rss_mib": peak_rss / 2**20,
        "table_mib_before": before.size_bytes / 2**20,
        "table_mib_after": after.size_bytes / 2**20,
        "peak_dead_tuples": peak_dead,
        "dead_tuples_after": after.dead_rows,
        "dead_tuples_settled": settled.dead_rows,
        "settle_seconds": waited,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--payload", type=int, default=300)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.payload)
