"""Scaling out: the same backlog drained by 1, 2 and 4 relay processes, ordered and not.

The rows are spread over ``--keys`` ordering keys (executions); ordered mode
publishes each key's rows one relay at a time, in order, unordered mode ignores keys.

.venv/bin/python -m benchmarks.scaling --rows 100000 --relays 1 2 4 --keys 1000
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from typing import Any

import anyio

from benchmarks.common import fresh_outbox, servers, start_relay, stop_relay
from benchmarks.drain import preload
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.store import OutboxStore, RetryPolicy


async def drain_with(
    settings: Settings, relays: int, rows: int, *, keys: int, ordered: bool
) -> float:
    await preload(settings, rows, 300, keys=keys)
    store = OutboxStore(settings.names, RetryPolicy())
    started = time.perf_counter()
    ordering = "true" if ordered else "false"
    processes = [await start_relay(settings, OUTBOX_ORDERING=ordering) for _ in range(relays)]
    async with await connect_postgres(settings, autocommit=True) as conn:
        while (await store.lag(conn)).pending:  # noqa: ASYNC110 - polls the database
            await anyio.sleep(0.05)
    elapsed = time.perf_counter() - started
    for process in processes:
        await stop_relay(process)
    return rows / elapsed


async def main(rows: int, relay_counts: list[int], keys: int = 1000) -> dict[str, Any]:
    results: dict[str, dict[str, float]] = {"unordered": {}, "ordered": {}}
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)
        for relays in relay_counts:
            for mode in ("unordered", "ordered"):  # side by side, alternating
                settings = await fresh_outbox(database_url, nats_url)
                results[mode][str(relays)] = await drain_with(
                    settings, relays, rows, keys=keys, ordered=mode == "ordered"
                )
    base = results["unordered"][str(relay_counts[0])]
    print(f"drain of {rows:,} rows over {keys:,} keys by N relay processes (start-up included)")
    print(f"  {'relays':>6} {'unordered':>12} {'ordered':>12} {'ordered/unordered':>18}")
    for count in map(str, relay_counts):
        plain, ordered = results["unordered"][count], results["ordered"][count]
        print(f"  {count:>6} {plain:>12,.0f} {ordered:>12,.0f} {ordered / plain:>18.2f}")
    speedups = ", ".join(f"{rate / base:.2f}x" for rate in results["unordered"].values())
    print(f"  unordered, vs 1 relay: {speedups}")
    return {"keys": keys, **results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--relays", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--keys", type=int, default=1000, help="Ordering keys the rows use.")
    args = parser.parse_args()
    anyio.run(main, args.rows, args.relays, args.keys)
