"""Ordered delivery under faults: relays killed, frozen past their claim and restarted,
with a poison row in one execution, while producers interleave many executions."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import anyio
import psycopg

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.dead_letters import DeadLetterFilter, purge_dead_letters
from outbox_relay.producer import Producer
from tests.acceptance.cli import env_for, relay_process
from tests.faults.conftest import (
    Load,
    all_started,
    assert_nothing_lost_or_doubled,
    frozen_mid_batch,
)
from tests.helpers import lag, wait_until
from tests.noetl import event_columns
from tests.proxy import TcpProxy
from tests.servers import Servers

POISONED_EXECUTION = 7


def _poison(settings: Settings) -> None:
    """A row of one execution's key that no stream takes: it holds that key back."""
    with psycopg.connect(settings.database_url) as conn:
        Producer(schema=settings.schema, subject_prefix=settings.subject_prefix).enqueue(
            conn,
            subject="nobody.listens",
            payload=b"{}",
            msg_id="poison",
            ordering_key=str(POISONED_EXECUTION),
        )


async def _dead_lettered(settings: Settings) -> bool:
    return (await lag(settings)).dead_letters == 1


async def test_order_holds_while_relays_die_freeze_and_restart(
    on_shared_each_table: Settings, tmp_path: Path
) -> None:
    settings = on_shared_each_table  # publish timeout 2 s: a frozen relay's claim lapses after 9 s
    env = env_for(
        settings,
        OUTBOX_BATCH_SIZE="100",
        OUTBOX_MAX_ATTEMPTS="3",
        OUTBOX_RETRY_BACKOFF="1s",
        OUTBOX_RETRY_BACKOFF_MAX="1s",
    )
    load = Load(settings, rate=300, producers=4, executions=40)
    with (
        relay_process(env, tmp_path / "a.log") as a,
        relay_process(env, tmp_path / "b.log") as b,
        relay_process(env, tmp_path / "c.log") as c,
    ):
        await wait_until(lambda: all_started(a, b, c), within=30)
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await anyio.sleep(2)
            _poison(settings)
            await anyio.sleep(2)
            a.signal(signal.SIGKILL)  # its partitions go to b and c
            await anyio.sleep(3)
            await wait_until(lambda: frozen_mid_batch(settings, b), within=30, interval=0)
            await anyio.sleep(settings.claim_hold_bound + 4)  # b's session is ended
            with relay_process(env, tmp_path / "a2.log") as a2:  # a comes back
                b.signal(signal.SIGCONT)
                await anyio.sleep(5)
                load.stop()
                # Held behind the poison row until an operator purges it.
                await wait_until(lambda: _dead_lettered(settings), within=30)
                assert (await lag(settings)).held > 0
                async with await connect_postgres(settings) as conn:
                    await purge_dead_letters(
                        conn, settings.names, DeadLetterFilter(everything=True)
                    )
                    await conn.commit()
                summary = await assert_nothing_lost_or_doubled(
                    "ordered: kill -9, SIGSTOP past claim, restart, poison row; 3 relays"
                    + (", NoETL's schema" if event_columns(settings) else ""),
                    settings,
                )
                for relay in (b, c, a2):
                    relay.signal(signal.SIGTERM)
                assert [r.wait(timeout=30) for r in (b, c, a2)] == [0, 0, 0]
    assert summary["out_of_order"] == 0
    assert load.committed > 1000


async def test_order_holds_when_a_slow_relay_freezes_past_its_claim_under_a_byte_budget(
    on_shared: Settings, servers: Servers, tmp_path: Path
) -> None:
    """The hand-off and byte-budget holes as a review found them: one relay reaches NATS
    through a link adding 300 ms each way and is frozen three times past its claim (its
    sessions time out apart, the partitions move while rows are still claimed); both
    cut batches by a 20 KB byte budget (rows locked past it). One producer writes each
    execution, so verify checks every key against event id order."""
    settings = on_shared
    slow_link = await TcpProxy(servers.nats_url).start()
    slow_link.delay = 0.3
    budget = {"OUTBOX_BATCH_MAX_BYTES": "20000"}
    load = Load(settings, rate=250, producers=1, executions=30)
    try:
        with (
            relay_process(
                env_for(replace(settings, nats_urls=(slow_link.url,)), **budget),
                tmp_path / "slow.log",
            ) as slow,
            relay_process(env_for(settings, **budget), tmp_path / "direct.log") as direct,
        ):
            await wait_until(lambda: all_started(slow, direct), within=30)
            async with anyio.create_task_group() as tg:
                tg.start_soon(load.run)
                for _ in range(3):
                    await anyio.sleep(3)
                    slow.signal(signal.SIGSTOP)
                    await anyio.sleep(12)  # past the claim hold bound (9 s)
                    slow.signal(signal.SIGCONT)
                await anyio.sleep(3)
                load.stop()
            summary = await assert_nothing_lost_or_doubled(
                "ordered: 2 relays, one 300 ms each way from NATS and frozen 3 x 12 s; "
                "20 KB byte budget; one producer per execution",
                settings,
            )
            for relay in (slow, direct):
                relay.signal(signal.SIGTERM)
            codes = [await anyio.to_thread.run_sync(r.wait, 30) for r in (slow, direct)]
            assert codes == [0, 0], slow.output()
    finally:
        await slow_link.close()
    assert summary["out_of_order"] == 0
    assert load.committed > 5000
