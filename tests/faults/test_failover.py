"""PostgreSQL failover: a primary and a streaming standby, producers and relay on both
through a multi-host URL (target_session_attrs=read-write)."""

import dataclasses
import functools
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psycopg
import pytest

from outbox_relay.config import Settings
from outbox_relay.producer import Producer
from tests.acceptance.cli import env_for, relay_process
from tests.conftest import make_settings
from tests.faults.conftest import (
    Heal,
    Load,
    all_started,
    assert_nothing_lost_or_doubled,
    assert_recovered,
    healed,
    migrated,
)
from tests.helpers import drained, lag, wait_until
from tests.proxy import TcpProxy
from tests.replicated import ReplicatedPostgres
from tests.servers import Servers


@pytest.fixture
async def replication_link() -> AsyncIterator[TcpProxy]:
    """Between the standby and the primary, to cut: buffered WAL goes nowhere."""
    proxy = TcpProxy("postgresql://127.0.0.1:1")
    yield proxy
    await proxy.close()


# "standby-confirmed": asynchronous replication, the relay publishing only what the
# standby has flushed.
@pytest.fixture(params=["asynchronous", "synchronous", "standby-confirmed"])
async def pair(
    request: pytest.FixtureRequest, replication_link: TcpProxy
) -> AsyncIterator[ReplicatedPostgres]:
    pair = ReplicatedPostgres(synchronous=request.param == "synchronous")
    pair.mode = request.param
    replication_link.target = ("127.0.0.1", pair.primary.port)
    pair.replication_port = (await replication_link.start()).port
    with pair:
        yield pair


async def on_pair(servers: Servers, database_url: str) -> Settings:
    return make_settings(
        Servers(database_url, servers.nats_url, "primary and standby"), publish_timeout=2.0
    )


async def since(promoted: float, settings: Settings) -> Heal:
    """Recovery counts from the promotion, not from when we could look."""
    return Heal(promoted, (await healed(settings)).last_row)


async def test_failover_then_switchover_under_load(
    pair: ReplicatedPostgres, replication_link: TcpProxy, servers: Servers, tmp_path: Path
) -> None:
    confirmed = pair.mode == "standby-confirmed"
    name = f"PostgreSQL failover, {pair.mode} standby, then switchover, under load"
    settings = await migrated(await on_pair(servers, pair.url))
    settings = dataclasses.replace(settings, standby_confirmed=confirmed)
    load = Load(settings, rate=100)
    with relay_process(env_for(settings), tmp_path / "relay.log") as relay:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await wait_until(lambda: all_started(relay))
            await anyio.sleep(2)
            # The standby is cut off for a second: asynchronous commits of that second
            # exist on the primary only (the relay publishes them); synchronous ones
            # wait for the standby and are never visible.
            replication_link.cut()
            await anyio.sleep(1)
            await anyio.to_thread.run_sync(pair.crash, pair.primary)
            await anyio.to_thread.run_sync(pair.promote, pair.standby)
            promoted = time.monotonic()
            pair.swap()
            reseed = functools.partial(pair.seed_standby, pair.standby, pair.primary)
            lossless = pair.synchronous or confirmed
            if lossless:
                # Every commit waits for a synchronous standby, the relay's deletes
                # too; a standby-confirmed relay waits for one: nothing moves until
                # one is back.
                await anyio.to_thread.run_sync(reseed)
            await assert_recovered(name, settings, await since(promoted, settings))
            if not lossless:
                # Later a clean switchover back: the old primary, re-seeded, takes over.
                await anyio.to_thread.run_sync(reseed)
            await anyio.sleep(2)
            await anyio.to_thread.run_sync(pair.stop, pair.primary)
            await anyio.to_thread.run_sync(pair.promote, pair.standby)
            promoted = time.monotonic()
            pair.swap()
            await anyio.to_thread.run_sync(pair.rejoin, pair.standby, pair.primary)
            switchover = f"{name}: switchover"
            took = await assert_recovered(switchover, settings, await since(promoted, settings))
            print(f"{switchover}: backlog delivered {took:.1f}s after the promotion")
            await anyio.sleep(1)
            load.stop()
        await wait_until(lambda: drained(settings), within=60)  # before the relay stops
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    assert "PostgreSQL unavailable" in relay.output()
    summary = await assert_nothing_lost_or_doubled(name, settings, rolled_back_by_failover=True)
    if pair.synchronous or confirmed:
        assert summary["rolled_back_by_failover"] == 0, summary
    else:
        # Published from the old primary, never on the new one: verify names them.
        assert summary["rolled_back_by_failover"] > 0, summary


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("pair", ["asynchronous"], indirect=True)
async def test_a_relay_on_a_standby_says_so_once_and_waits(
    pair: ReplicatedPostgres, servers: Servers, tmp_path: Path
) -> None:
    settings = await migrated(await on_pair(servers, pair.url))
    standby = pair.standby.url
    on_standby = dataclasses.replace(settings, database_url=standby)
    # Pointed at the standby alone: plainly, and asking libpq for a writable server.
    urls = {"plain": standby, "read-write": f"{standby}?target_session_attrs=read-write"}
    with (
        relay_process(
            env_for(dataclasses.replace(settings, database_url=urls["plain"])),
            tmp_path / "plain.log",
        ) as plain,
        relay_process(
            env_for(dataclasses.replace(settings, database_url=urls["read-write"])),
            tmp_path / "read-write.log",
        ) as read_write,
    ):
        relays = (plain, read_write)

        async def both_waiting() -> bool:
            return all("waiting for a writable primary" in r.output() for r in relays)

        await wait_until(both_waiting, within=30)
        spent = [cpu_seconds(r.process.pid) for r in relays]
        await anyio.sleep(5)
        for relay, before in zip(relays, spent, strict=True):
            assert relay.process.poll() is None, relay.output()
            lines = relay.output().splitlines()
            assert len([line for line in lines if "read-only" in line]) == 1, lines
            assert cpu_seconds(relay.process.pid) - before < 0.5, "busy waiting"
        producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)
        with psycopg.connect(settings.database_url) as conn:
            producer.emit_event(conn, event_type="before.promotion", execution_id=1)

        async def replicated() -> bool:
            return (await lag(on_standby)).pending == 1

        await wait_until(replicated)
        await anyio.to_thread.run_sync(pair.promote, pair.standby)
        await wait_until(lambda: all_started(*relays), within=15)
        for relay in relays:
            relay.signal(signal.SIGTERM)
            assert relay.wait(timeout=15) == 0
    await assert_nothing_lost_or_doubled(
        "relay started on a standby, waited, standby promoted", on_standby
    )
