"""Drain throughput: our relay against the bare nats-py publish ceiling and peer relays.

All run side by side on the same servers, alternating round by round, and the ratios
are what to read (these machines are shared and noisy). ``outbox-relay run`` runs as
its own process, as users run it (with its CPU time); the rest in this process::

    .venv/bin/python -m benchmarks.drain --rows 100000 --payload 300 --rounds 3

Peer relays (``benchmarks/peers.py``) run when installed: ``pip install -e '.[bench]'``.

Servers: ``OUTBOX_DATABASE_URL`` / ``OUTBOX_NATS_URL`` if set, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import nats
from nats.js.api import StorageType, StreamConfig
from psycopg import sql

from benchmarks import peers
from benchmarks.common import (
    ProcessDrain,
    drop_outbox,
    fresh_outbox,
    interleaved_medians,
    process_drain,
    servers,
)
from benchmarks.peers import PeerDrain, timed_drain
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.jetstream import BatchSupport
from outbox_relay.relay import Relay


async def preload(
    settings: Settings, rows: int, payload: int, *, keys: int = 0, analyze: bool = True
) -> None:
    """``rows`` outbox rows, in one commit; with ``keys``, spread round robin over that
    many ordering keys."""
    async with await connect_postgres(settings, autocommit=True) as conn:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {}.event_outbox (event_id, subject, payload, ordering_key)"
                " SELECT 'bench-' || g, %s, convert_to(repeat('x', %s), 'UTF8'),"
                " CASE WHEN %s > 0 THEN (g %% %s)::text END"
                " FROM generate_series(1, %s) g"
            ).format(sql.Identifier(settings.schema)),
            (f"{settings.subject_prefix}.bench", payload, keys, max(keys, 1), rows),
        )
        if not analyze:
            return
        await conn.execute(
            sql.SQL("VACUUM ANALYZE {}.event_outbox").format(sql.Identifier(settings.schema))
        )


@dataclass(frozen=True)
class RelayRun:
    """How one contender's ``outbox-relay run`` runs: ``OUTBOX_*`` overrides, and the
    checkout it runs from (another revision's), if not this one."""

    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None


async def interleaved_process_drains(
    database_url: str,
    nats_url: str,
    relays: dict[str, RelayRun],
    *,
    rows: int,
    payload: int,
    rounds: int,
    keys: int = 0,
) -> dict[str, ProcessDrain]:
    """Each relay drains ``rows`` fresh rows once a round, relays interleaved; the
    medians of each one's rate and CPU seconds."""
    cpu: dict[str, list[float]] = {}

    async def measure(name: str) -> float:
        settings = await fresh_outbox(database_url, nats_url)
        fill = functools.partial(preload, settings, rows, payload, keys=keys, analyze=False)
        run = relays[name]
        drained = await process_drain(settings, rows, fill, cwd=run.cwd, env=run.env)
        await drop_outbox(settings)  # no vacuum of it during the next drain
        cpu.setdefault(name, []).append(drained.cpu_seconds)
        return drained.rows_per_s

    rates = await interleaved_medians(list(relays), rounds, measure)
    return {name: ProcessDrain(rates[name], statistics.median(cpu[name])) for name in relays}


async def relay_drain(
    database_url: str, nats_url: str, settings: Settings, rows: int, payload: int
) -> float:
    await preload(settings, rows, payload)
    relay = Relay(settings, relay_id="bench")
    return await timed_drain(nats_url, settings, rows, lambda _js: relay.run())


async def ordered_relay_drain(
    database_url: str, nats_url: str, settings: Settings, rows: int, payload: int
) -> float:
    """The same, with the rows spread over 1,000 ordering keys (executions)."""
    await preload(settings, rows, payload, keys=1000)
    relay = Relay(settings, relay_id="bench")
    return await timed_drain(nats_url, settings, rows, lambda _js: relay.run())


async def nats_ceiling(nats_url: str, rows: int, payload: int) -> float:
    """nats-py's own pipelined JetStream publisher, same message shape, no database."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name = f"ceiling_{uuid.uuid4().hex[:8]}"
    await js.add_stream(
        StreamConfig(
            name=name, subjects=[f"{name}.>"], storage=StorageType.FILE, duplicate_window=120
        )
    )
    data = b"x" * payload
    started = time.perf_counter()
    futures = [
        await js.publish_async(f"{name}.bench", data, headers={"Nats-Msg-Id": f"bench-{i}"})
        for i in range(rows)
    ]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await js.delete_stream(name)
    await nc.close()
    return rows / elapsed


CEILING_SPREAD_LIMIT = 0.15

# ``outbox-relay run`` as its own process: on a stream it creates (fast-ingest batches
# where the server takes them, nats-server 2.14), and on existing streams that allow
# atomic batches only, or no batches (one PubAck per message).
PROCESSES: dict[str, BatchSupport | None] = {
    "outbox-relay run": None,
    "outbox-relay run, atomic batches": BatchSupport(atomic=True),
    "outbox-relay run, 1 PubAck/msg": BatchSupport(),
}


async def main(rows: int, payload: int, rounds: int, *, with_peers: bool = True) -> dict[str, Any]:
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)
        drains: dict[str, PeerDrain] = {
            "outbox-relay": relay_drain,
            "outbox-relay ordered": ordered_relay_drain,
            **(peers.installed() if with_peers else {}),
        }
        names = ["nats-py ceiling", *PROCESSES, *drains]
        rates: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in PROCESSES}
        for _ in range(rounds):
            rates["nats-py ceiling"].append(await nats_ceiling(nats_url, rows, payload))
            for name, stream in PROCESSES.items():
                settings = await fresh_outbox(database_url, nats_url)
                fill = functools.partial(preload, settings, rows, payload, analyze=False)
                drained = await process_drain(settings, rows, fill, stream=stream)
                rates[name].append(drained.rows_per_s)
                cpu[name].append(drained.cpu_per_100k(rows))
            for name, drain in drains.items():
                settings = await fresh_outbox(database_url, nats_url)
                rates[name].append(await drain(database_url, nats_url, settings, rows, payload))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    ceilings = rates["nats-py ceiling"]
    # A ratio to a ceiling that moved by more than this between rounds is noise.
    spread = (max(ceilings) - min(ceilings)) / statistics.median(ceilings)
    honest = spread < CEILING_SPREAD_LIMIT
    # Each round's drain over the same round's ceiling, then the median of those.
    ratios = {
        name: statistics.median(r / c for r, c in zip(values, ceilings, strict=True))
        for name, values in rates.items()
    }
    print(
        f"rows {rows}, payload {payload} B, rounds {rounds} (medians, rows/s); "
        f"ceiling spread {spread:.0%} ({min(ceilings):,.0f}-{max(ceilings):,.0f})"
        + ("" if honest else f": over {CEILING_SPREAD_LIMIT:.0%}, no ratio stated")
    )
    print(f"  {'':32} {'rows/s':>10} {'÷ ceiling':>10} {'CPU s/100k':>11}")
    for name, rate in medians.items():
        used = f"{cpu_medians[name]:11.2f}" if name in cpu_medians else ""
        ratio = f"{ratios[name]:10.2f}" if honest else f"{'—':>10}"
        print(f"  {name:32} {rate:10,.0f} {ratio} {used}")
    return {
        "rows": rows,
        "payload_bytes": payload,
        "rows_per_s": medians,
        "ceiling_spread": spread,
        "over_ceiling": ratios if honest else None,
        "relay_cpu_s_per_100k": cpu_medians,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="Ours and the ceiling only.")
    args = parser.parse_args()
    anyio.run(
        functools.partial(main, with_peers=not args.no_peers), args.rows, args.payload, args.rounds
    )
