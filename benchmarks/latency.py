"""End-to-end latency: from a producer's commit to the message stored in the stream.

Producers commit events at a fixed rate and note the wall-clock time each commit
returned. Two ends are measured for every event: *stored*, the time the stream
stored it (the timestamp JetStream gives each message, same host clock), and *seen*,
when an ordered JetStream consumer in this process got it (stored, plus the
delivery and this busy process's own delays). The relay runs as its own process, as
in production. Two wake-ups, side by side: NOTIFY (ours) and poll-only (no
notification, a 100 ms poll)::

    .venv/bin/python -m benchmarks.latency --rates 100 1000 --seconds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack

import anyio
import nats
import psycopg
from nats.aio.msg import Msg
from psycopg import sql

from benchmarks.common import fresh_outbox, servers, shipped_trigger, start_relay, stop_relay
from outbox_relay.config import Settings
from outbox_relay.producer import Producer

PRODUCERS = 8


async def measure(settings: Settings, rate: int, seconds: float, poll: str) -> dict[str, float]:
    committed: dict[str, float] = {}
    arrived: dict[str, float] = {}
    stored: dict[str, float] = {}
    nc = await nats.connect(settings.nats_urls[0])

    async def on_message(msg: Msg) -> None:
        msg_id = (msg.headers or {})["Nats-Msg-Id"]
        arrived[msg_id] = time.time()
        stored[msg_id] = msg.metadata.timestamp.timestamp()

    relay = await start_relay(settings, OUTBOX_POLL_INTERVAL=poll)
    await anyio.sleep(2)  # started (the stream created) and idle
    await nc.jetstream().subscribe(
        settings.subject_wildcard, stream=settings.stream, ordered_consumer=True, cb=on_message
    )
    producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)
    interval = PRODUCERS / rate
    deadline = time.perf_counter() + seconds

    async def produce(worker: int) -> None:
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
            next_at = time.perf_counter() + worker * interval / PRODUCERS
            while next_at < deadline:
                await anyio.sleep(max(0.0, next_at - time.perf_counter()))
                event_id = await producer.emit_event_async(
                    conn, event_type="latency", execution_id=worker
                )
                await conn.commit()
                committed[str(event_id)] = time.time()
                next_at += interval

    async with anyio.create_task_group() as tg:
        for worker in range(PRODUCERS):
            tg.start_soon(produce, worker)
    with anyio.move_on_after(10):
        while len(arrived) < len(committed):  # noqa: ASYNC110 - counting callbacks
            await anyio.sleep(0.05)
    await stop_relay(relay)
    await nc.close()
    seen = sorted((arrived[i] - t) * 1000 for i, t in committed.items() if i in arrived)
    kept = sorted((stored[i] - t) * 1000 for i, t in committed.items() if i in stored)
    seen_cuts = statistics.quantiles(seen, n=100)
    cuts = statistics.quantiles(kept, n=100)
    return {
        # Over the time the commits took: producers that fall behind finish late.
        "achieved_rate": len(committed) / (max(committed.values()) - min(committed.values())),
        "p50_ms": cuts[49],
        "p99_ms": cuts[98],
        "max_ms": kept[-1],
        "seen_p50_ms": seen_cuts[49],
        "seen_p99_ms": seen_cuts[98],
        "missing": len(committed) - len(seen),
    }


async def set_notify(settings: Settings, enabled: bool, ours: str) -> None:
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as c:
        if enabled:
            await c.execute(ours.encode())
        else:
            await c.execute(
                sql.SQL(
                    "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql"
                    " AS 'BEGIN RETURN NULL; END'"
                ).format(sql.Identifier(settings.schema, "event_outbox_notify"))
            )


async def main(rates: list[int], seconds: float) -> list[dict[str, float | str]]:
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)
        print(f"commit → stored latency, {seconds:g}s per cell, {PRODUCERS} producers")
        print(
            f"{'mode':<22}{'rate':>7}{'achieved':>10}  stored: {'p50 ms':>7}{'p99 ms':>8}"
            f"{'max ms':>8}  seen: {'p50 ms':>7}{'p99 ms':>8}"
        )
        rows: list[dict[str, float | str]] = []
        for rate in rates:
            for mode, notify, poll in (
                ("notify (ours)", True, "5s"),
                ("poll 100ms", False, "100ms"),
            ):
                settings = await fresh_outbox(database_url, nats_url)
                await set_notify(settings, notify, await shipped_trigger(settings))
                r = await measure(settings, rate, seconds, poll)
                print(
                    f"{mode:<22}{rate:>7}{r['achieved_rate']:>10.0f}  {'':8}{r['p50_ms']:>7.1f}"
                    f"{r['p99_ms']:>8.1f}{r['max_ms']:>8.1f}  {'':6}{r['seen_p50_ms']:>7.1f}"
                    f"{r['seen_p99_ms']:>8.1f}"
                    + (f"  missing {r['missing']:.0f}" if r["missing"] else "")
                )
                rows.append({"mode": mode, "rate": rate, **r})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    anyio.run(main, args.rates, args.seconds)
