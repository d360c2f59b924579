"""Scaling out: the same backlog drained by 1, 2 and 4 relay processes on one database.

.venv/bin/python -m benchmarks.scaling --rows 100000 --relays 1 2 4
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack

import anyio

from benchmarks.common import fresh_outbox, servers, start_relay, stop_relay
from benchmarks.drain import preload
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.store import OutboxStore, RetryPolicy


async def drain_with(settings: Settings, relays: int, rows: int) -> float:
    await preload(settings, rows, 300)
    store = OutboxStore(settings.names, RetryPolicy())
    started = time.perf_counter()
    processes = [await start_relay(settings) for _ in range(relays)]
    async with await connect_postgres(settings, autocommit=True) as conn:
        while (await store.lag(conn)).pending:  # noqa: ASYNC110 - polls the database
            await anyio.sleep(0.05)
    elapsed = time.perf_counter() - started
    for process in processes:
        await stop_relay(process)
    return rows / elapsed


async def main(rows: int, relay_counts: list[int]) -> dict[str, float]:
    results: dict[str, float] = {}
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)
        for relays in relay_counts:
            settings = await fresh_outbox(database_url, nats_url)
            results[str(relays)] = await drain_with(settings, relays, rows)
    base = results[str(relay_counts[0])]
    print(f"drain of {rows:,} rows by N relay processes (start-up included)")
    for count, rate in results.items():
        print(f"  {count} relays  {rate:>9,.0f} rows/s  {rate / base:5.2f}x")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--relays", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    anyio.run(main, args.rows, args.relays)
