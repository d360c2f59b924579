"""Run every benchmark, print each table, and write the results as JSON.

    .venv/bin/python -m benchmarks [--quick]

Results go to benchmarks/results/<UTC time>.json (not committed); benchmarks/README.md
keeps the latest table by hand, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from benchmarks import (
    backlog,
    drain,
    latency,
    memory,
    ordered,
    producer_keys,
    producer_overhead,
    scaling,
)

RESULTS = Path(__file__).parent / "results"


async def run_all(quick: bool) -> dict[str, Any]:
    scale = 10 if quick else 1
    return {
        "drain": await drain.main(100_000 // scale, 300, 3),
        "drain_4k": await drain.main(100_000 // scale, 4096, 3),
        "ordered": await ordered.main(100_000 // scale, [1, 97, 1000], 1 if quick else 3),
        "producer_overhead": await producer_overhead.main(
            [1, 8, 32, 64], 4 // min(scale, 2), 1 if quick else 3
        ),
        "producer_keys": await producer_keys.main(
            [1, 10, 1000], 4 // min(scale, 2), 1 if quick else 3
        ),
        "latency": await latency.main(
            [100, 500, 1000], 10 // scale, [1], ["floor", "ours"], 1 if quick else 3
        ),
        "memory": await memory.main(),
        "backlog": await backlog.main(1_000_000 // scale, 300),
        "scaling": await scaling.main(100_000 // scale, [1, 2, 4]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark.")
    parser.add_argument("--quick", action="store_true", help="Smaller sizes, one round.")
    args = parser.parse_args()
    results = anyio.run(run_all, args.quick)
    now = datetime.now(UTC)
    report = {
        "when": now.isoformat(),
        "machine": {
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "quick": args.quick,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{now:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
