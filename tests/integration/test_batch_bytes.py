"""A batch is bounded by payload bytes as well as rows: memory follows the byte budget."""

from __future__ import annotations

from dataclasses import replace

import psycopg
from nats.aio.client import Client as NATS

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.store import OutboxStore, RetryPolicy
from tests.helpers import drained, producer_for, running_relay, stream_count, wait_until

KIB = 1024


def enqueue_sizes(settings: Settings, sizes: list[int]) -> None:
    producer = producer_for(settings)
    with psycopg.connect(settings.database_url) as conn:
        for n, size in enumerate(sizes):
            producer.enqueue(
                conn,
                subject=f"{settings.subject_prefix}.big",
                payload=b"x" * size,
                msg_id=f"big-{n}",
                ordering_key="k",
            )
        conn.commit()


async def claimed_sizes(settings: Settings, max_bytes: int) -> list[int]:
    store = OutboxStore(settings.names, RetryPolicy())
    async with await connect_postgres(settings) as conn:
        messages = await store.claim(conn, 500, max_bytes=max_bytes)
        await conn.rollback()
    return [len(m.payload) for m in messages]


async def test_a_claim_stops_at_the_byte_budget_and_always_takes_one(outbox: Settings) -> None:
    enqueue_sizes(outbox, [600 * KIB, 600 * KIB, 600 * KIB, 1 * KIB])
    # Rows that start below 1 MiB: the first two; the rest wait for the next claim.
    assert await claimed_sizes(outbox, 1024 * KIB) == [600 * KIB, 600 * KIB]
    # A row larger than the whole budget still goes, alone.
    assert await claimed_sizes(outbox, 100 * KIB) == [600 * KIB]
    assert await claimed_sizes(outbox, 10 * 1024 * KIB) == [600 * KIB] * 3 + [1 * KIB]


async def test_a_relay_with_a_small_byte_budget_delivers_everything_in_order(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, batch_max_bytes=700 * KIB)
    enqueue_sizes(settings, [300 * KIB] * 10)
    async with running_relay(settings) as relay:
        await wait_until(lambda: drained(settings))
    assert await stream_count(nc, settings) == 10
    assert relay.stats.batches >= 4  # three rows at most per batch
