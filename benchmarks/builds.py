"""Drain by relay build: ``outbox-relay run`` of other git revisions beside this
checkout's, interleaved round by round on the same servers, medians kept, with each
relay's CPU per 100,000 rows. Measures what a change gained, side by side::

    .venv/bin/python -m benchmarks.builds --revs 295be04 85a1c1a --rows 100000 --rounds 5

Each revision is checked out (``git worktree``) into a temporary directory and its
relay run from there (``python -m`` imports the package of its working directory);
the revisions must share this checkout's schema version (the claim fence refuses any
other) and its dependencies.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

import anyio

from benchmarks.common import servers
from benchmarks.drain import RelayRun, interleaved_process_drains

HERE = "this checkout"


def worktree(stack: ExitStack, rev: str) -> str:
    """A checkout of ``rev``, removed on exit."""
    path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / rev
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True)
    stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(path)], check=True)
    return str(path)


async def main(revs: list[str], rows: int, rounds: int, payload: int, ordering: str) -> None:
    with ExitStack() as stack:
        relays = {
            rev: RelayRun({"OUTBOX_ORDERING": ordering}, worktree(stack, rev)) for rev in revs
        }
        relays[HERE] = RelayRun({"OUTBOX_ORDERING": ordering})
        drained = await interleaved_process_drains(
            *servers(stack), relays, rows=rows, payload=payload, rounds=rounds, keys=1000
        )
    base = drained[revs[0]].rows_per_s
    print(
        f"drain of {rows:,} rows of {payload} B over 1,000 keys, ordering {ordering}, "
        f"`outbox-relay run`, medians of {rounds}"
    )
    for build, drain in drained.items():
        print(
            f"  {build:>14}: {drain.rows_per_s:9,.0f} rows/s  {drain.rows_per_s / base:5.2f}x"
            f"  CPU {drain.cpu_per_100k(rows):.2f} s/100k"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revs", nargs="+", required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload", type=int, default=300)
    parser.add_argument("--ordering", choices=["true", "false"], default="false")
    args = parser.parse_args()
    anyio.run(main, args.revs, args.rows, args.rounds, args.payload, args.ordering)
