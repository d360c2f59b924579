"""``outbox-relay verify`` at scale: its peak memory and its rate, run as an operator runs it.

N events committed (one ``INSERT … SELECT`` over 1,000 executions) and the same N
messages in the stream, as a relay would have published them (msg id, ordering key and
sequence headers; the event's execution and id in the payload); then ``outbox-relay
verify`` as a process of its own, timed, its peak RSS read from the kernel
(``wait4``)::

    .venv/bin/python -m benchmarks.verify --messages 1000000 10000000

``--checkout`` runs the verify of another revision's checkout (``git worktree add``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from contextlib import ExitStack

import anyio
import anyio.to_thread
import nats
import orjson
from psycopg import sql

from benchmarks.common import drop_outbox, fresh_outbox, outbox_env, servers
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.jetstream import ensure_stream

EXECUTIONS = 1000


async def fill(settings: Settings, messages: int) -> None:
    async with await connect_postgres(settings, autocommit=True) as conn:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (execution_id, event_id, event_type)"
                " SELECT g %% %s, g, 'bench' FROM generate_series(1, %s) AS g"
            ).format(sql.Identifier(settings.schema, "event")),
            (EXECUTIONS, messages),
        )
    nc = await nats.connect(settings.nats_urls[0])
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings)
        subject = f"{settings.subject_prefix}.bench"
        # With PubAcks, in windows: core publishes the server drops under load.
        for first in range(1, messages + 1, 10_000):
            acks = [
                await js.publish_async(
                    subject,
                    orjson.dumps({"execution_id": event_id % EXECUTIONS, "event_id": event_id}),
                    headers={
                        "Nats-Msg-Id": str(event_id),
                        "Outbox-Ordering-Key": str(event_id % EXECUTIONS),
                        "Outbox-Sequence": str(event_id),
                    },
                )
                for event_id in range(first, min(first + 10_000, messages + 1))
            ]
            await asyncio.gather(*acks)
        held = (await js.stream_info(settings.stream)).state.messages
        assert held == messages, f"the stream holds {held} of {messages}"
    finally:
        await nc.close()


def verify_process(settings: Settings, checkout: str | None) -> tuple[float, int, bytes]:
    """Seconds, peak RSS in bytes, and the JSON report of one ``outbox-relay verify``."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "outbox_relay", "verify", "--json", "--strict-order"],
        env=outbox_env(settings),
        stdout=subprocess.PIPE,
        cwd=checkout,  # another revision's checkout runs its own verify
    )
    assert child.stdout is not None
    report = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    assert os.waitstatus_to_exitcode(status) == 0, report
    return elapsed, usage.ru_maxrss * 1024, report


async def main(sizes: list[int], checkout: str | None) -> None:
    with ExitStack() as stack:
        database_url, nats_url = servers(stack)
        print(f"{'messages':>12}  {'seconds':>8}  {'messages/s':>11}  {'peak RSS MiB':>12}")
        for messages in sizes:
            settings = await fresh_outbox(database_url, nats_url)
            try:
                await fill(settings, messages)
                elapsed, peak, report = await anyio.to_thread.run_sync(
                    verify_process, settings, checkout
                )
                assert orjson.loads(report)["ok"] == messages, report
                print(
                    f"{messages:>12,}  {elapsed:>8.1f}  {messages / elapsed:>11,.0f}"
                    f"  {peak / 2**20:>12.0f}",
                    flush=True,
                )
            finally:
                nc = await nats.connect(nats_url)
                await nc.jetstream().delete_stream(settings.stream)
                await nc.close()
                await drop_outbox(settings)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--checkout", help="run the verify of another checkout (a git worktree)")
    args = parser.parse_args()
    anyio.run(main, args.messages, args.checkout)
