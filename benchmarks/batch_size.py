"""Drain by claim size: ``outbox-relay run`` with different ``OUTBOX_BATCH_SIZE``,
interleaved round by round, medians kept, with the relay's CPU per 100,000 rows::

    .venv/bin/python -m benchmarks.batch_size --rows 100000 --sizes 500 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import statistics
from contextlib import ExitStack

import anyio

from benchmarks.common import fresh_outbox, interleaved_medians, process_drain, servers
from benchmarks.drain import preload


async def main(rows: int, sizes: list[int], rounds: int, payload: int) -> None:
    cpu: dict[str, list[float]] = {}
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)

        async def measure(size: str) -> float:
            settings = await fresh_outbox(database_url, nats_url)
            fill = functools.partial(preload, settings, rows, payload, analyze=False)
            drained = await process_drain(settings, rows, fill, OUTBOX_BATCH_SIZE=size)
            cpu.setdefault(size, []).append(drained.cpu_per_100k(rows))
            return drained.rows_per_s

        modes = [str(size) for size in sizes]
        medians = await interleaved_medians(modes, rounds, measure)
    print(f"drain of {rows:,} rows of {payload} B, `outbox-relay run`, medians of {rounds}")
    for size in modes:
        print(
            f"  batch {size:>6}: {medians[size]:9,.0f} rows/s"
            f"  CPU {statistics.median(cpu[size]):.2f} s/100k"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload", type=int, default=300)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.sizes, args.rounds, args.payload)
