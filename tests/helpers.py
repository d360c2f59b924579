"""Shared test tools: run a relay in the test's event loop, read the stream, wait."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.jetstream import read_stream
from outbox_relay.producer import Producer
from outbox_relay.publish import MSG_ID_HEADER
from outbox_relay.relay import Relay
from outbox_relay.store import Lag, OutboxStore, RetryPolicy
from tests.noetl import event_columns


@asynccontextmanager
async def running_relay(settings: Settings, relay_id: str = "test") -> AsyncIterator[Relay]:
    relay = Relay(settings, relay_id=relay_id)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        with anyio.fail_after(15):
            await relay.wait_started()
        yield relay
        relay.stop()


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, within: float = 20.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await anyio.sleep(interval)


async def stream_messages(nc: NATS, settings: Settings) -> list[Msg]:
    return await read_stream(nc.jetstream(), settings.stream, subject=settings.subject_wildcard)


async def stream_count(nc: NATS, settings: Settings) -> int:
    return int((await nc.jetstream().stream_info(settings.stream)).state.messages)


def msg_ids(messages: list[Msg]) -> list[str]:
    return [m.headers[MSG_ID_HEADER] for m in messages if m.headers]


def assert_exactly_once(messages: list[Msg], expected: Iterable[str]) -> None:
    expected_ids = set(expected)
    counts = Counter(msg_ids(messages))
    doubled = {i: n for i, n in counts.items() if n > 1}
    assert not doubled, f"stored more than once: {doubled}"
    assert set(counts) == expected_ids, (
        f"missing {len(expected_ids - set(counts))}, unexpected {len(set(counts) - expected_ids)}"
    )


def producer_for(settings: Settings, **kwargs: Any) -> Producer:
    """A producer writing to the outbox ``settings`` relays."""
    return Producer(schema=settings.schema, subject_prefix=settings.subject_prefix, **kwargs)


def emit_events(
    settings: Settings, count: int, *, execution_id: int = 1, event_type: str = "test.event"
) -> list[str]:
    """Commit ``count`` events, one transaction each; return their ids as msg ids."""
    producer = producer_for(settings)
    with psycopg.connect(settings.database_url) as conn:
        return [
            str(
                producer.emit_event(
                    conn,
                    event_type=event_type,
                    execution_id=execution_id,
                    node_name=f"n{i}",
                    **event_columns(settings),
                )
            )
            for i in range(count)
        ]


async def drained(settings: Settings) -> bool:
    return (await lag(settings)).pending == 0


async def lag(settings: Settings) -> Lag:
    async with await connect_postgres(settings, autocommit=True) as conn:
        return await OutboxStore(settings.names, RetryPolicy()).lag(conn)


async def fetch_all(settings: Settings, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    async with await connect_postgres(settings, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


def dead_letters(settings: Settings) -> sql.Composed:
    return sql.SQL(
        "SELECT event_id, subject, attempts, reason FROM {}.event_outbox_dead_letter ORDER BY id"
    ).format(sql.Identifier(settings.schema))
