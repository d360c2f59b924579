"""Outages are waited out and never count against a row."""

import logging
from dataclasses import replace

import anyio
import psycopg
import pytest
from nats.aio.client import Client as NATS
from psycopg import sql

from outbox_relay.config import Settings
from tests.helpers import (
    assert_exactly_once,
    drained,
    emit_events,
    fetch_all,
    lag,
    running_relay,
    stream_messages,
    wait_until,
)
from tests.servers import Servers


async def attempts(settings: Settings) -> list[int]:
    rows = await fetch_all(
        settings,
        sql.SQL("SELECT attempts FROM {}.event_outbox").format(sql.Identifier(settings.schema)),
    )
    return [r[0] for r in rows]


async def test_nats_down_leaves_rows_pending_then_drains(
    servers: Servers, outbox: Settings, nc: NATS
) -> None:
    if servers.nats is None:
        pytest.skip("needs a nats-server the tests own, to stop and start it")
    async with running_relay(outbox):
        before = emit_events(outbox, 10)
        await wait_until(lambda: drained(outbox))
        servers.nats.stop()
        try:
            during = emit_events(outbox, 10)
            await anyio.sleep(3)  # several publish attempts' worth of outage
            assert (await lag(outbox)).pending == 10
            assert await attempts(outbox) == [0] * 10  # not blamed
        finally:
            servers.nats.start()  # same port, same store
        await wait_until(lambda: drained(outbox), within=60)
    assert_exactly_once(await stream_messages(nc, outbox), [*before, *during])
    assert (await lag(outbox)).dead_letters == 0


async def test_listener_killed_reconnects_and_wakes_again(outbox: Settings) -> None:
    settings = replace(outbox, poll_interval=120.0, ordered=False)  # wake-ups by NOTIFY
    async with running_relay(settings):
        for _ in range(3):
            async with await psycopg.AsyncConnection.connect(
                settings.database_url, autocommit=True
            ) as admin:
                cur = await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE query ILIKE %s AND pid <> pg_backend_pid()",
                    (f"LISTEN%{settings.schema}%",),
                )
                assert [r[0] for r in await cur.fetchall()] == [True]
            await anyio.sleep(1.5)  # the listener backs off, reconnects, listens again
            emit_events(settings, 1)
            # Only a notification can deliver this within the wait: the poll is 120 s.
            await wait_until(lambda: drained(settings), within=15)


async def test_relay_sessions_killed_mid_stream_lose_nothing(
    outbox: Settings, nc: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox_relay")
    settings = replace(outbox, batch_size=20)
    ids = emit_events(settings, 2000)
    killed = 0
    async with running_relay(settings, relay_id=f"victim-{settings.schema}") as relay:
        async with await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True
        ) as admin:
            for _ in range(5):
                await anyio.sleep(0.1)
                cur = await admin.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                    " FROM pg_stat_activity WHERE application_name = %s",
                    (f"outbox-relay victim-{settings.schema}",),
                )
                row = await cur.fetchone()
                killed += row[0] if row else 0
        await wait_until(lambda: drained(settings), within=60)
    assert killed >= 5  # both sessions, again and again
    assert_exactly_once(await stream_messages(nc, settings), ids)
    assert await attempts(settings) == []
    assert relay.stats.dead_lettered == 0
    # An outage logged ends with a line saying it ended, as NATS's do.
    said = [
        m
        for r in caplog.records
        if r.name == "outbox_relay.relay" and "PostgreSQL" in (m := r.getMessage())
    ]
    assert any("PostgreSQL unavailable" in m for m in said)
    assert "PostgreSQL reachable again" in said[-1], said
