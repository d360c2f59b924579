"""Ordered against unordered drain, by how many ordering keys the rows use.

The same 300 B rows, spread round robin over 1 (a single hot key), 97 and 1,000
keys, drained by ``outbox-relay run`` as its own process, ordered and unordered,
alternating round by round, and the hot key once more on existing streams that allow
atomic batches only and no batches (one PubAck per message); the relay's CPU time per
100,000 rows beside each. Each round starts one cell further along, so no cell always
follows the same one, and a cell's ratio is taken to the unordered drain of its own
round (the machine's speed drifts between rounds); the medians are reported::

    .venv/bin/python -m benchmarks.ordered --rows 100000 --keys 1 97 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
from contextlib import ExitStack
from typing import Any

import anyio

from benchmarks.common import drop_outbox, fresh_outbox, process_drain, servers
from benchmarks.drain import preload
from outbox_relay.jetstream import BatchSupport

# The relay's own stream (every batch kind the server takes), or an existing one.
STREAMS = {
    "": None,
    "atomic batches": BatchSupport(atomic=True),
    "1 PubAck/msg": BatchSupport(),
}


async def main(rows: int, keys: list[int], rounds: int) -> dict[str, Any]:
    # "unordered" ignores keys, so one key count stands for all.
    cells: list[tuple[str, int, str]] = [
        ("unordered", keys[-1], ""),
        *(("ordered", k, "") for k in keys),
        ("ordered", keys[0], "atomic batches"),
        ("ordered", keys[0], "1 PubAck/msg"),
    ]
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)
        for round_number in range(rounds):
            start = round_number % len(cells)
            this_round: dict[str, float] = {}
            for mode, count, path in cells[start:] + cells[:start]:
                name = mode if mode == "unordered" else f"ordered, {count} keys"
                name += f", {path}" if path else ""
                settings = await fresh_outbox(database_url, nats_url)
                fill = functools.partial(preload, settings, rows, 300, keys=count, analyze=False)
                ordering = "true" if mode == "ordered" else "false"
                drained = await process_drain(
                    settings, rows, fill, stream=STREAMS[path], env={"OUTBOX_ORDERING": ordering}
                )
                await drop_outbox(settings)  # no vacuum of it during the next cell
                this_round[name] = drained.rows_per_s
                rates.setdefault(name, []).append(drained.rows_per_s)
                cpu.setdefault(name, []).append(drained.cpu_per_100k(rows))
            for name, rate in this_round.items():
                ratios.setdefault(name, []).append(rate / this_round["unordered"])
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio_medians = {name: statistics.median(values) for name, values in ratios.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"drain of {rows:,} rows of 300 B, `outbox-relay run`, medians of {rounds} rounds")
    print(f"  {'':34} {'rows/s':>10} {'÷ unordered':>12} {'CPU s/100k':>11}")
    for name, rate in medians.items():
        print(f"  {name:34} {rate:10,.0f} {ratio_medians[name]:12.2f} {cpu_medians[name]:11.2f}")
    return {
        "rows": rows,
        "rows_per_s": medians,
        "over_unordered": ratio_medians,
        "relay_cpu_s_per_100k": cpu_medians,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 97, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.keys, args.rounds)
