"""A three-node nats-server cluster on loopback with an R3 stream: kill its leader under load."""

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError

from outbox_relay.config import Settings
from outbox_relay.embedded import EmbeddedNats
from outbox_relay.jetstream import connect_nats
from tests.acceptance.cli import env_for, relay_process
from tests.conftest import make_settings
from tests.faults.conftest import (
    Load,
    assert_nothing_lost_or_doubled,
    assert_recovered,
    healed,
    migrated,
)
from tests.helpers import drained, wait_until
from tests.servers import Servers

NODES = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cluster() -> Iterator[list[EmbeddedNats]]:
    client_ports = [free_port() for _ in range(NODES)]
    route_ports = [free_port() for _ in range(NODES)]
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    nodes = [
        EmbeddedNats(
            port=client_ports[i],
            extra_args=(
                "--server_name", f"n{i}",
                "--cluster_name", "outbox",
                "--cluster", f"nats://127.0.0.1:{route_ports[i]}",
                "--routes", routes,
            ),
        )
        for i in range(NODES)
    ]  # fmt: skip
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.__exit__(None, None, None)


async def test_r3_stream_leader_killed_under_load(
    servers: Servers, cluster: list[EmbeddedNats], tmp_path: Path
) -> None:
    settings: Settings = await migrated(
        make_settings(
            Servers(servers.database_url, cluster[0].url, "cluster"),
            nats_urls=tuple(node.url for node in cluster),
            publish_timeout=2.0,
        )
    )
    nc = await connect_nats(settings)
    js = nc.jetstream()
    config = StreamConfig(
        name=settings.stream,
        subjects=[settings.subject_wildcard],
        storage=StorageType.FILE,
        num_replicas=3,
        duplicate_window=120,
    )

    async def stream_created() -> bool:
        try:
            await js.add_stream(config)
        except (APIError, TimeoutError):
            return False  # JetStream's meta leader is still being elected
        return True

    await wait_until(stream_created, within=60, interval=0.5)
    load = Load(settings, rate=100)
    with relay_process(env_for(settings), tmp_path / "relay.log") as relay:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await anyio.sleep(3)
            leader = (await js.stream_info(settings.stream)).cluster.leader  # type: ignore[union-attr]
            victim = cluster[int(str(leader).removeprefix("n"))]
            victim.signal(signal.SIGKILL)
            await anyio.sleep(8)
            await anyio.to_thread.run_sync(victim.start)  # same port, same store
            heal = await healed(settings)
            name = f"R3 stream, leader {leader} killed and restarted, under load"
            await assert_recovered(name, settings, heal)
            load.stop()
        await wait_until(lambda: drained(settings), within=90)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    await nc.close()
    await assert_nothing_lost_or_doubled(name, settings)
