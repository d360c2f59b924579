"""Relay peak RSS against payload size: the batch byte budget bounds memory.

For each payload size, a backlog is preloaded and drained by ``outbox-relay run`` as a
process of its own, once with the default byte budget and once bounded by rows alone
(500 rows a batch, as before the budget); the peak RSS is the kernel's high-water mark
(VmHWM) read just before the relay stops::

    .venv/bin/python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import anyio

from benchmarks.common import fresh_outbox, servers, start_relay, stop_relay
from benchmarks.drain import preload
from outbox_relay.config import DEFAULT_BATCH_MAX_BYTES
from outbox_relay.database import connect_postgres
from outbox_relay.store import OutboxStore, RetryPolicy

# payload bytes -> rows: about 450 MB of backlog for the large sizes.
CASES = {300: 100_000, 64 * 1024: 4_000, 900 * 1024: 500}
BUDGETS = {"byte budget": DEFAULT_BATCH_MAX_BYTES, "rows only": 2**31 - 1}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def drained_peak(payload: int, rows: int, budget: int) -> float:
    with ExitStack() as stack:
        settings = await fresh_outbox(*servers(stack))
        await preload(settings, rows, payload)
        relay = await start_relay(settings, OUTBOX_BATCH_MAX_BYTES=str(budget))
        store = OutboxStore(settings.names, RetryPolicy())
        async with await connect_postgres(settings, autocommit=True) as conn:
            while True:  # polled: the backlog is the relay's, in another process
                if not (await store.lag(conn)).pending:
                    break
                await anyio.sleep(0.5)
        peak = peak_rss_mib(relay.pid)
        await stop_relay(relay)
    return peak


async def main() -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for payload, rows in CASES.items():
        results[str(payload)] = {
            name: await drained_peak(payload, rows, budget) for name, budget in BUDGETS.items()
        }
    print(f"relay peak RSS (MiB), batch size 500, default budget {DEFAULT_BATCH_MAX_BYTES:,} B")
    print(f"{'payload':>10}{'rows':>9}" + "".join(f"{name:>14}" for name in BUDGETS))
    for payload, rows in CASES.items():
        row = results[str(payload)]
        print(f"{payload:>10,}{rows:>9,}" + "".join(f"{row[name]:>14.0f}" for name in BUDGETS))
    return results


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    anyio.run(main)
