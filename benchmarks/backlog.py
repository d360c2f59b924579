"""A large backlog: steady drain, bounded memory, no runaway bloat.

Preloads rows, runs the relay as its own process until the outbox is empty, and
reports the drain rate over time, the relay's peak RSS, and the outbox table's size
and dead tuples before and after (autovacuum as configured on the server)::

    .venv/bin/python -m benchmarks.backlog --rows 1000000 --payload 300
"""

from __future__ import annotations

import argparse
import itertools
import time
from contextlib import ExitStack

import anyio
import psutil
from psycopg import sql

from benchmarks.common import fresh_outbox, servers, start_relay, stop_relay
from benchmarks.drain import preload
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.store import OutboxStore, RetryPolicy

TABLE_STATS = """
SELECT pg_total_relation_size(%(table)s::regclass), coalesce(n_dead_tup, 0)
FROM pg_stat_user_tables WHERE relid = %(table)s::regclass
"""


async def table_stats(settings: Settings) -> tuple[int, int]:
    async with await connect_postgres(settings, autocommit=True) as conn:
        table = sql.Identifier(settings.schema, "event_outbox").as_string()
        cur = await conn.execute(TABLE_STATS, {"table": table})
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def main(rows: int, payload: int) -> dict[str, float]:
    with ExitStack() as stack:
        settings = await fresh_outbox(*servers(stack))
        await preload(settings, rows, payload)
        size_before, dead_before = await table_stats(settings)
        started = time.perf_counter()
        relay = await start_relay(settings, OUTBOX_MAX_AGE="0")
        process = psutil.Process(relay.pid)
        peak_rss, samples = 0, []
        store = OutboxStore(settings.names, RetryPolicy())
        async with await connect_postgres(settings, autocommit=True) as conn:
            pending = rows
            while pending:
                await anyio.sleep(1)
                peak_rss = max(peak_rss, process.memory_info().rss)
                pending = (await store.lag(conn)).pending
                samples.append((time.perf_counter() - started, pending))
        elapsed = time.perf_counter() - started
        await stop_relay(relay)
        size_after, dead_after = await table_stats(settings)
    print(
        f"backlog {rows:,} rows of {payload} B drained in {elapsed:.1f}s: {rows / elapsed:,.0f}/s"
    )
    for (t0, p0), (t1, p1) in itertools.pairwise(samples):
        if int(t1) % 5 == 0:
            print(f"  t={t1:5.1f}s  pending {p1:>9,}  rate {(p0 - p1) / (t1 - t0):>8,.0f}/s")
    print(f"  relay peak RSS {peak_rss / 2**20:.0f} MiB")
    print(
        f"  outbox table {size_before / 2**20:.0f} MiB, {dead_before:,} dead tuples before; "
        f"{size_after / 2**20:.0f} MiB, {dead_after:,} dead tuples after"
    )

    return {
        "rows": rows,
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
        "relay_peak_rss_mib": peak_rss / 2**20,
        "table_mib_before": size_before / 2**20,
        "table_mib_after": size_after / 2**20,
        "dead_tuples_after": dead_after,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--payload", type=int, default=300)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.payload)
