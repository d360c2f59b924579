"""The floor: the simplest correct outbox relay we can write, to measure ours against.

LISTEN; on each notification (or after a second without one), claim every visible
row in id order with ``FOR UPDATE SKIP LOCKED``, delete it in the same transaction,
publish each with its ``Nats-Msg-Id`` and wait for the PubAcks, then commit. A crash
before the commit rolls the delete back and the rows are published again, which
JetStream's duplicate window absorbs: correct, and nothing more. No partitions, no
backoff, no dead letters, no metrics; one process, so per-key order holds too.

Run as its own process, as ours is (``benchmarks.latency`` starts it)::

    python -m benchmarks.floor_relay DATABASE_URL NATS_URL SCHEMA CHANNEL
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import nats
import psycopg
from nats.js import JetStreamContext
from psycopg import sql

CLAIM = """
DELETE FROM {outbox} WHERE id IN (
    SELECT id FROM {outbox} ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED
) RETURNING id, event_id, subject, payload, headers
"""


async def relay_once(
    work: psycopg.AsyncConnection[tuple[Any, ...]], js: JetStreamContext, claim: sql.Composed
) -> int:
    async with work.transaction():
        rows = await (await work.execute(claim)).fetchall()
        rows.sort()  # DELETE … RETURNING does not keep the subquery's order
        await asyncio.gather(
            *(
                js.publish(
                    subject,
                    bytes(payload),
                    headers={**(headers or {}), "Nats-Msg-Id": event_id},
                )
                for _, event_id, subject, payload, headers in rows
            )
        )
    return len(rows)


async def main(database_url: str, nats_url: str, schema: str, channel: str) -> None:
    claim = sql.SQL(CLAIM).format(outbox=sql.Identifier(schema, "event_outbox"))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    listen = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    work = await psycopg.AsyncConnection.connect(database_url)
    await work.execute("SET jit = off")  # as ours runs: no compile on a stock server
    await work.commit()
    await listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        while await relay_once(work, js, claim):
            pass
        async for _ in listen.notifies(timeout=1.0, stop_after=1):
            pass
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
