"""Liveness of ordered delivery: keys never wait on a relay that cannot publish, and a
session that squats on key partitions is seen."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import psycopg
import pytest
from nats.aio.client import Client as NATS

from outbox_relay.config import Settings
from outbox_relay.liveness import STEP_DOWN_AFTER
from outbox_relay.queries import KEY_PARTITIONS, PARTITION_LOCK_CLASS
from outbox_relay.relay import Relay
from outbox_relay.verify import Window, verify
from tests.acceptance.cli import env_for, outbox_relay
from tests.helpers import drained, producer_for, running_relay, wait_until
from tests.proxy import TcpProxy
from tests.servers import Servers


@pytest.fixture
async def nats_proxy(servers: Servers) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(servers.nats_url).start()
    yield proxy
    await proxy.close()


def owned(relay: Relay) -> float:
    return relay.metrics.registry.get_sample_value("outbox_relay_partitions_owned") or 0.0


def emit_over_keys(settings: Settings, executions: int) -> None:
    producer = producer_for(settings)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for execution_id in range(executions):
            producer.emit_event(conn, event_type="step.done", execution_id=execution_id)


async def test_a_relay_cut_off_from_nats_gives_its_keys_to_the_others(
    outbox: Settings, nats_proxy: TcpProxy, nc: NATS
) -> None:
    """It used to keep its partitions: 95 rows waited for as long as NATS was away."""
    behind_proxy = replace(outbox, nats_urls=(nats_proxy.url,))
    async with running_relay(behind_proxy, "a") as a, running_relay(outbox, "b") as b:
        await wait_until(lambda: _split(a, b), within=10)
        nats_proxy.cut()
        cut = time.monotonic()
        emit_over_keys(outbox, 100)  # keys in a's partitions as well as b's
        await wait_until(lambda: drained(outbox), within=30, interval=0.05)
        took = time.monotonic() - cut
        # A batch in flight at the cut fails only at its publish timeout.
        bound = max(STEP_DOWN_AFTER, outbox.publish_timeout) + 5
        assert took < bound, f"a's keys waited {took:.1f}s"
        assert owned(a) == 0
        assert owned(b) == KEY_PARTITIONS

        # NATS back: a takes its share again, and every key flows.
        await nats_proxy.heal()
        await wait_until(lambda: _split(a, b), within=15)
        emit_over_keys(outbox, 100)
        await wait_until(lambda: drained(outbox), within=10)
    async with await psycopg.AsyncConnection.connect(outbox.database_url) as conn:
        report = await verify(conn, nc.jetstream(), outbox, Window())
    assert report.ok == 200
    assert report.clean, report.as_dict()


async def _split(a: Relay, b: Relay) -> bool:
    return owned(a) > 0 and owned(b) > 0 and owned(a) + owned(b) == KEY_PARTITIONS


async def test_a_session_squatting_on_partitions_shows_in_metrics_and_check(
    outbox: Settings,
) -> None:
    settings = replace(outbox, lag_interval=0.2)
    with psycopg.connect(
        settings.database_url, autocommit=True, application_name="squatter"
    ) as squatter:
        for partition in range(KEY_PARTITIONS):
            squatter.execute(
                "SELECT pg_advisory_lock(%s, %s)",
                (PARTITION_LOCK_CLASS + partition, settings.names.lock_object),
            )
        async with running_relay(settings, "victim") as relay:
            await wait_until(lambda: _squatted(relay, KEY_PARTITIONS), within=5)
        check = await outbox_relay("check", env=env_for(settings))
        assert check.returncode == 1
        assert check.stderr.count("\n") == 1, check.stderr  # one line
        assert "application squatter" in check.stderr
        assert "64 key partitions without being a relay" in check.stderr
    async with running_relay(settings, "free") as relay:
        await wait_until(lambda: _squatted(relay, 0), within=5)


async def _squatted(relay: Relay, partitions: int) -> bool:
    value = relay.metrics.registry.get_sample_value("outbox_relay_partitions_held_by_non_relays")
    return value == partitions
