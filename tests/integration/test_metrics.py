"""Metrics, /healthz and /readyz of a running relay, scraped over HTTP."""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import psycopg
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.metrics import HealthServer
from outbox_relay.relay import Relay
from tests.helpers import drained, emit_events, producer_for, running_relay, wait_until
from tests.servers import Servers


@dataclass(frozen=True)
class Response:
    status: int
    body: str


def _get(url: str) -> Response:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return Response(response.status, response.read().decode())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read().decode())


class Endpoint:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> Response:
        return await anyio.to_thread.run_sync(_get, self.base + path)

    async def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = (await self.get("/metrics")).body
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def value(self, name: str, **labels: str) -> float:
        return (await self.samples())[(name, tuple(sorted(labels.items())))]


@asynccontextmanager
async def served(relay: Relay) -> AsyncIterator[Endpoint]:
    server = HealthServer(relay.metrics, "127.0.0.1", 0)
    server.start()
    try:
        yield Endpoint(server.port)
    finally:
        server.stop()


async def test_metrics_count_what_the_relay_did(outbox: Settings) -> None:
    async with running_relay(outbox) as relay, served(relay) as endpoint:
        assert (await endpoint.get("/healthz")).status == 200
        emit_events(outbox, 25)
        await wait_until(lambda: drained(outbox))
        assert await endpoint.value("outbox_relay_events_total", outcome="ok") == 25
        assert await endpoint.value("outbox_relay_events_total", outcome="dead_lettered") == 0
        assert await endpoint.value("outbox_relay_batch_rows_sum") == 25
        assert await endpoint.value("outbox_relay_publish_duration_seconds_count") >= 1
        assert await endpoint.value("outbox_relay_connected", server="postgres") == 1
        assert await endpoint.value("outbox_relay_connected", server="nats") == 1
        info = await endpoint.samples()
        assert any(
            name == "outbox_relay_build_info" and ("stream", outbox.stream) in labels
            for name, labels in info
        )


async def test_lag_gauges_refresh_on_their_interval(outbox: Settings) -> None:
    async with running_relay(outbox) as relay, served(relay) as endpoint:
        # Rows due in an hour: pending, and left alone by the relay.
        with psycopg.connect(outbox.database_url) as conn:
            for i in range(7):
                producer_for(outbox).emit_event(
                    conn, event_type="test.later", execution_id=1, node_name=f"n{i}"
                )
            conn.execute(
                sql.SQL("UPDATE {} SET next_attempt_at = now() + interval '1 hour'").format(
                    outbox.names.identifiers()["outbox_table"]
                )
            )
        await wait_until(lambda: value_is(endpoint, "outbox_relay_outbox_pending_rows", 7))
        assert await endpoint.value("outbox_relay_outbox_oldest_age_seconds") >= 0
        relay.stop()
        await wait_until(lambda: status_is(endpoint, 503))
        assert "relay stopping" in (await endpoint.get("/readyz")).body
        assert await endpoint.value("outbox_relay_state", outbox_relay_state="stopping") == 1


async def value_is(endpoint: Endpoint, name: str, expected: float, **labels: str) -> bool:
    return await endpoint.value(name, **labels) == expected


async def test_ready_only_while_the_stream_exists(outbox: Settings, nc: NATS) -> None:
    async with running_relay(outbox) as relay, served(relay) as endpoint:
        await wait_until(lambda: status_is(endpoint, 200))
        assert (await endpoint.get("/readyz")).body == "ready\n"
        await nc.jetstream().delete_stream(outbox.stream)
        await wait_until(lambda: status_is(endpoint, 503))
        assert "stream missing" in (await endpoint.get("/readyz")).body
        assert await endpoint.value("outbox_relay_stream_present") == 0


async def test_not_ready_while_nats_is_down(servers: Servers, outbox: Settings) -> None:
    if servers.nats is None:
        pytest.skip("needs a nats-server the tests own, to stop and start it")
    async with running_relay(outbox) as relay, served(relay) as endpoint:
        await wait_until(lambda: status_is(endpoint, 200))
        servers.nats.stop()
        try:
            await wait_until(lambda: status_is(endpoint, 503))
            assert "NATS disconnected" in (await endpoint.get("/readyz")).body
            assert await endpoint.value("outbox_relay_connected", server="nats") == 0
        finally:
            servers.nats.start()
        await wait_until(lambda: status_is(endpoint, 200), within=30)


async def status_is(endpoint: Endpoint, status: int) -> bool:
    return (await endpoint.get("/readyz")).status == status


async def test_unknown_path_is_404(outbox: Settings) -> None:
    async with running_relay(outbox) as relay, served(relay) as endpoint:
        assert (await endpoint.get("/nope")).status == 404


def _dockerfile_healthcheck() -> list[str]:
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", dockerfile, re.MULTILINE | re.DOTALL)
    assert match, "the Dockerfile has no HEALTHCHECK in JSON form"
    command: list[str] = json.loads(match[1])
    return [sys.executable if command[0] == "python" else command[0], *command[1:]]


async def test_the_container_health_check_follows_readiness(outbox: Settings) -> None:
    command = _dockerfile_healthcheck()
    async with running_relay(outbox) as relay, served(relay) as endpoint:
        port = endpoint.base.rsplit(":", 1)[1]
        env = {**os.environ, "OUTBOX_METRICS_PORT": port}
        await wait_until(lambda: status_is(endpoint, 200))
        assert (await anyio.run_process(command, env=env, check=False)).returncode == 0
        relay.stop()  # not ready while stopping
        await wait_until(lambda: status_is(endpoint, 503))
        assert (await anyio.run_process(command, env=env, check=False)).returncode != 0
