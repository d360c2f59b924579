"""Drain throughput: our relay against the bare nats-py JetStream publish ceiling.

Both run side by side in one process on the same servers, alternating, and the
ratio is what to read (these machines are shared and noisy)::

    .venv/bin/python -m benchmarks.drain --rows 20000 --payload 300 --rounds 3

Servers: ``OUTBOX_DATABASE_URL`` / ``OUTBOX_NATS_URL`` if set, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from contextlib import ExitStack

import anyio
import nats
from nats.js.api import StorageType, StreamConfig
from psycopg import sql

from benchmarks.common import fresh_outbox, servers
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.relay import Relay
from outbox_relay.store import OutboxStore, RetryPolicy


async def preload(settings: Settings, rows: int, payload: int) -> None:
    async with await connect_postgres(settings, autocommit=True) as conn:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {}.event_outbox (event_id, subject, payload)"
                " SELECT 'bench-' || g, %s, convert_to(repeat('x', %s), 'UTF8')"
                " FROM generate_series(1, %s) g"
            ).format(sql.Identifier(settings.schema)),
            (f"{settings.subject_prefix}.bench", payload, rows),
        )
        await conn.execute(
            sql.SQL("VACUUM ANALYZE {}.event_outbox").format(sql.Identifier(settings.schema))
        )


async def relay_drain(settings: Settings, rows: int, payload: int) -> float:
    await preload(settings, rows, payload)
    store = OutboxStore(settings.names, RetryPolicy())
    relay = Relay(settings, relay_id="bench")
    conn = await connect_postgres(settings, autocommit=True)
    async with conn, anyio.create_task_group() as tg:
        started = time.perf_counter()
        tg.start_soon(relay.run)
        while (await store.lag(conn)).pending:  # noqa: ASYNC110 - polls the database
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - started
        relay.stop()
    assert relay.stats.published == rows, relay.stats
    return rows / elapsed


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


async def main(rows: int, payload: int, rounds: int) -> dict[str, float]:
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)
        relay_rates, ceiling_rates = [], []
        for _ in range(rounds):
            settings = await fresh_outbox(database_url, nats_url)
            ceiling_rates.append(await nats_ceiling(nats_url, rows, payload))
            relay_rates.append(await relay_drain(settings, rows, payload))
        relay, ceiling = statistics.median(relay_rates), statistics.median(ceiling_rates)
        print(f"rows {rows}, payload {payload} B, rounds {rounds} (medians)")
        print(f"  nats-py publish ceiling  {ceiling:10,.0f} msgs/s")
        print(f"  outbox-relay drain       {relay:10,.0f} rows/s")
        print(f"  relay / ceiling          {relay / ceiling:10.2f}")
    return {
        "rows": rows,
        "payload_bytes": payload,
        "ceiling_msgs_per_s": ceiling,
        "relay_rows_per_s": relay,
        "relay_over_ceiling": relay / ceiling,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.payload, args.rounds)
