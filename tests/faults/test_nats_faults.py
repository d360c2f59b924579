"""Faults on the NATS side: server down, frozen, client closed, stream deleted, poison rows."""

import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import psycopg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.embedded import EmbeddedNats
from outbox_relay.jetstream import connect_nats
from outbox_relay.producer import Producer
from outbox_relay.verify import Window
from tests.acceptance.cli import env_for, relay_process
from tests.faults.conftest import Load, assert_nothing_lost_or_doubled, assert_recovered, healed
from tests.helpers import drained, fetch_all, lag, running_relay, wait_until

NATS_FROZEN = "nats-server frozen (SIGSTOP) 8 s under load"


async def test_nats_stopped_30s_under_load_then_restarted(
    on_own_nats: Settings, own_nats: EmbeddedNats, tmp_path: Path
) -> None:
    settings = on_own_nats
    load = Load(settings, rate=100)
    with relay_process(env_for(settings), tmp_path / "relay.log") as relay:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await anyio.sleep(2)
            own_nats.stop()
            await anyio.sleep(30)
            assert (await lag(settings)).pending > 0
            own_nats.start()  # same port, same store
            heal = await healed(settings)
            await assert_recovered("nats-server stopped 30 s under load", settings, heal)
            load.stop()
        await wait_until(lambda: drained(settings), within=60)
        assert relay.process.poll() is None  # it waited the outage out
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    assert "dead-lettered 0" in relay.output()
    await assert_nothing_lost_or_doubled("nats-server stopped 30 s under load", settings)


async def test_nats_frozen_publishes_time_out_and_nothing_is_marked(
    on_own_nats: Settings, own_nats: EmbeddedNats, tmp_path: Path
) -> None:
    settings = on_own_nats  # publish timeout 2 s
    load = Load(settings, rate=100)
    with relay_process(env_for(settings), tmp_path / "relay.log") as relay:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await anyio.sleep(2)
            own_nats.signal(signal.SIGSTOP)
            await anyio.sleep(8)
            own_nats.signal(signal.SIGCONT)
            heal = await healed(settings)
            await assert_recovered(NATS_FROZEN, settings, heal)
            load.stop()
        await wait_until(lambda: drained(settings), within=60)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    assert "no PubAck before the publish timeout" in relay.output()
    await assert_nothing_lost_or_doubled(NATS_FROZEN, settings)


async def test_a_nats_client_that_gave_up_is_rebuilt(on_own_nats: Settings) -> None:
    # Ours reconnects for ever, but a client closed for any reason (its reconnect
    # budget spent, an auth error after a server restart) must not end the relay.
    settings = on_own_nats
    producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)
    async with running_relay(settings) as relay:
        assert relay._publisher is not None
        await relay._publisher.close()
        with psycopg.connect(settings.database_url) as conn:
            for _ in range(20):
                producer.emit_event(conn, event_type="after.close", execution_id=1)
        await wait_until(lambda: drained(settings), within=30)
        assert relay._publisher is not None
        assert not relay._publisher.closed
    await assert_nothing_lost_or_doubled("NATS client closed, rebuilt", settings)


async def test_a_stream_deleted_under_load_is_recreated_as_at_start(
    on_own_nats: Settings, tmp_path: Path
) -> None:
    """Rows used to wait until an operator restored it, while a restarted relay would
    have created it: one policy now, the start's."""
    settings = on_own_nats
    load = Load(settings, rate=100)
    nc = await connect_nats(settings)
    js = nc.jetstream()
    with relay_process(env_for(settings), tmp_path / "relay.log") as relay:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await wait_until(lambda: _has_stream(js, settings.stream), within=20)
            await anyio.sleep(1)
            await js.delete_stream(settings.stream)
            deleted_at = datetime.now(UTC)
            await anyio.sleep(0.5)
            await wait_until(lambda: _has_stream(js, settings.stream), within=10)
            await anyio.sleep(2)
            load.stop()
        await wait_until(lambda: drained(settings), within=60)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    await nc.close()
    output = relay.output()
    assert f"stream {settings.stream} does not exist" in output
    assert f"stream {settings.stream} was deleted: created stream {settings.stream}" in output
    assert (await lag(settings)).dead_letters == 0
    # What the stream held before the delete went with it; everything after is there.
    await assert_nothing_lost_or_doubled(
        "stream deleted under load, recreated by the relay",
        settings,
        window=Window.between(deleted_at, None),
    )


async def _has_stream(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except Exception:  # noqa: BLE001
        return False
    return True


async def test_poison_rows_under_load_are_dead_lettered_without_blocking(
    on_own_nats: Settings, tmp_path: Path
) -> None:
    settings = on_own_nats
    nc = await connect_nats(settings)
    await nc.jetstream().add_stream(
        StreamConfig(
            name=settings.stream,
            subjects=[settings.subject_wildcard],
            max_msg_size=64 * 1024,
            duplicate_window=120,
        )
    )
    limit = nc.max_payload
    await nc.close()
    # Above the server's limit: the producer counts the relay's headers against its
    # own maximum, so only a misconfigured one lets such a row in.
    producer = Producer(
        schema=settings.schema, subject_prefix=settings.subject_prefix, max_payload=2 * limit
    )
    load = Load(settings, rate=100)
    env = env_for(settings, OUTBOX_MAX_ATTEMPTS="3")
    with relay_process(env, tmp_path / "relay.log") as relay:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await anyio.sleep(1)
            with psycopg.connect(settings.database_url) as conn:
                big = f"{settings.subject_prefix}.big"
                # Under max_payload alone, over it with the headers.
                producer.enqueue(conn, subject=big, payload=b"x" * (limit - 10), msg_id="p1")
                # Over the stream's max_msg_size.
                producer.enqueue(conn, subject=big, payload=b"y" * 100_000, msg_id="p2")
                # Bound by no stream.
                producer.enqueue(conn, subject="nowhere.at.all", payload=b"z", msg_id="p3")
            started = time.monotonic()
            await wait_until(lambda: _dead_letters(settings, 3), within=60)
            load.stop()
        await wait_until(lambda: drained(settings), within=30)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    assert time.monotonic() - started < 30
    assert "NATS disconnected" not in relay.output()  # no bad row dropped the connection
    reasons = dict(
        await fetch_all(
            settings,
            sql.SQL("SELECT event_id, reason FROM {}.event_outbox_dead_letter").format(
                sql.Identifier(settings.schema)
            ),
        )
    )
    assert "exceeds the server's max_payload" in reasons["p1"]
    assert "message size exceeds maximum allowed" in reasons["p2"]
    assert reasons["p3"] == "no stream binds subject nowhere.at.all"
    await assert_nothing_lost_or_doubled("poison rows under load (3 kinds)", settings)


async def _dead_letters(settings: Settings, count: int) -> bool:
    return (await lag(settings)).dead_letters >= count
