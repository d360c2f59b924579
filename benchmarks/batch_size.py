"""Drain by claim size: ``outbox-relay run`` with different ``OUTBOX_BATCH_SIZE``,
interleaved round by round, medians kept, with the relay's CPU per 100,000 rows::

    .venv/bin/python -m benchmarks.batch_size --rows 100000 --sizes 500 2000 --rounds 5
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

import anyio

from benchmarks.common import servers
from benchmarks.drain import RelayRun, interleaved_process_drains


async def main(rows: int, sizes: list[int], rounds: int, payload: int) -> None:
    relays = {str(size): RelayRun({"OUTBOX_BATCH_SIZE": str(size)}) for size in sizes}
    with ExitStack() as stack:
        drained = await interleaved_process_drains(
            *servers(stack), relays, rows=rows, payload=payload, rounds=rounds
        )
    print(f"drain of {rows:,} rows of {payload} B, `outbox-relay run`, medians of {rounds}")
    for size, drain in drained.items():
        print(
            f"  batch {size:>6}: {drain.rows_per_s:9,.0f} rows/s"
            f"  CPU {drain.cpu_per_100k(rows):.2f} s/100k"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload", type=int, default=300)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.sizes, args.rounds, args.payload)
