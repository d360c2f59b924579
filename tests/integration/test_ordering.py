"""Ordered delivery: each key's rows reach the stream in commit order, across relays."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import replace

import anyio
import orjson
import psycopg
from nats.aio.client import Client as NATS

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.dead_letters import DeadLetterFilter, purge_dead_letters
from outbox_relay.producer import Producer
from outbox_relay.verify import Report, Window, verify
from tests.helpers import drained, lag, producer_for, running_relay, stream_messages, wait_until

EXECUTIONS = 200
EVENTS_EACH = 50


async def verified(settings: Settings, nc: NATS) -> Report:
    async with await connect_postgres(settings, autocommit=True) as conn:
        return await verify(conn, nc.jetstream(), settings, Window())


def interleaved_producers(settings: Settings, producers: int) -> None:
    """``producers`` threads, each committing its executions' events round robin, one
    event per transaction, so every execution's events interleave with others'."""
    producer = producer_for(settings)

    def produce(worker: int) -> None:
        mine = range(worker, EXECUTIONS, producers)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for step in range(EVENTS_EACH):
                for execution_id in mine:
                    producer.emit_event(
                        conn, event_type="step.done", execution_id=execution_id, node_id=str(step)
                    )

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


async def test_three_relays_keep_every_execution_in_commit_order(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, batch_size=200)
    async with (
        running_relay(settings, "a") as a,
        running_relay(settings, "b") as b,
        running_relay(settings, "c") as c,
    ):
        interleaved_producers(settings, producers=8)
        await wait_until(lambda: drained(settings), within=120)
    report = await verified(settings, nc)
    assert report.as_dict() | {"samples": None} == {
        "ok": EXECUTIONS * EVENTS_EACH,
        "pending": 0,
        "lost": 0,
        "duplicate": 0,
        "unexpected": 0,
        "out_of_order": 0,
        "collided": 0,
        "clean": True,
        "samples": None,
    }
    # Each execution had one producer, so its commit order is its step order.
    steps: dict[int, list[int]] = defaultdict(list)
    for message in await stream_messages(nc, settings):
        event = orjson.loads(message.data)
        steps[event["execution_id"]].append(int(event["node_id"]))
    assert len(steps) == EXECUTIONS
    assert all(seen == list(range(EVENTS_EACH)) for seen in steps.values())
    # The work was spread: every relay published some executions.
    assert all(r.stats.published > 0 for r in (a, b, c)), [r.stats for r in (a, b, c)]


async def test_commit_order_wins_over_id_order(outbox: Settings, nc: NATS) -> None:
    """A later transaction of the same key waits for the first one's commit, so the
    stream shows commit order even when the event ids say otherwise."""
    producer = producer_for(outbox)
    returned: dict[str, float] = {}

    with (
        psycopg.connect(outbox.database_url) as first,
        psycopg.connect(outbox.database_url) as second,
    ):
        producer.emit_event(first, event_type="a", execution_id=9, event_id=2000)

        def write_second() -> None:
            # A smaller event id, written while the first transaction is open.
            producer.emit_event(second, event_type="b", execution_id=9, event_id=1000)
            returned["second"] = time.monotonic()
            second.commit()

        thread = threading.Thread(target=write_second)
        thread.start()
        await anyio.sleep(0.5)
        assert "second" not in returned  # waiting for the first transaction's key
        # Another key is not held up.
        with psycopg.connect(outbox.database_url) as other:
            producer.emit_event(other, event_type="c", execution_id=10, event_id=1500)
            other.commit()
        committed = time.monotonic()
        first.commit()
        thread.join(5)
        assert returned["second"] >= committed

    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
    nine = [
        m.headers["Nats-Msg-Id"]
        for m in await stream_messages(nc, outbox)
        if m.headers and m.headers.get("Outbox-Ordering-Key") == "9"
    ]
    assert nine == ["2000", "1000"]  # commit order, not id order
    assert (await verified(outbox, nc)).clean


def _enqueue(settings: Settings, subject: str, msg_id: str, key: str) -> None:
    with psycopg.connect(settings.database_url) as conn:
        Producer(schema=settings.schema, subject_prefix=settings.subject_prefix).enqueue(
            conn, subject=subject, payload=b"{}", msg_id=msg_id, ordering_key=key
        )


async def _poisoned(settings: Settings) -> list[str]:
    """Key "x": a row no stream takes, then two good ones; key "y": two good ones."""
    good = f"{settings.subject_prefix}.ok"
    _enqueue(settings, "nobody.listens", "x-poison", "x")
    for msg_id, key in (("x-1", "x"), ("y-1", "y"), ("x-2", "x"), ("y-2", "y")):
        _enqueue(settings, good, msg_id, key)
    return ["x-1", "x-2"]


async def _stored(nc: NATS, settings: Settings) -> list[str]:
    return [m.headers["Nats-Msg-Id"] for m in await stream_messages(nc, settings) if m.headers]


async def test_a_failed_row_holds_back_only_its_own_key(outbox: Settings, nc: NATS) -> None:
    settings = replace(outbox, max_attempts=3, retry_backoff=0.3, retry_backoff_max=0.3)
    held = await _poisoned(settings)
    async with running_relay(settings):
        await wait_until(lambda: _stored_is(nc, settings, ["y-1", "y-2"]))
        # The poison row retries, then is dead-lettered; x's rows wait behind it (hold).
        await wait_until(lambda: _dead_letters_are(settings, 1))
        await wait_until(lambda: _held_is(settings, 2))
        assert await _stored(nc, settings) == ["y-1", "y-2"]
        # The operator gives up on the poison row: the rest of x flows, in order.
        async with await connect_postgres(settings) as conn:
            await purge_dead_letters(conn, settings.names, DeadLetterFilter(everything=True))
            await conn.commit()
        await wait_until(lambda: drained(settings))
    assert await _stored(nc, settings) == ["y-1", "y-2", *held]
    assert (await verified(settings, nc)).out_of_order == []


async def test_skip_policy_lets_a_key_pass_its_dead_letter(outbox: Settings, nc: NATS) -> None:
    settings = replace(
        outbox, max_attempts=2, retry_backoff=0.2, retry_backoff_max=0.2, dead_letter_policy="skip"
    )
    held = await _poisoned(settings)
    async with running_relay(settings):
        await wait_until(lambda: drained(settings))
    stored = await _stored(nc, settings)
    assert [m for m in stored if m.startswith("x")] == held
    assert (await lag(settings)).dead_letters == 1


async def test_unordered_mode_ignores_keys(outbox: Settings, nc: NATS) -> None:
    settings = replace(
        outbox, ordered=False, max_attempts=50, retry_backoff=5.0, retry_backoff_max=5.0
    )
    await _poisoned(settings)
    async with running_relay(settings):
        # x's good rows go out at once, without waiting for the poison row.
        await wait_until(lambda: _stored_count_is(nc, settings, 4))


async def _stored_is(nc: NATS, settings: Settings, expected: list[str]) -> bool:
    return await _stored(nc, settings) == expected


async def _stored_count_is(nc: NATS, settings: Settings, count: int) -> bool:
    return len(await _stored(nc, settings)) == count


async def _dead_letters_are(settings: Settings, count: int) -> bool:
    return (await lag(settings)).dead_letters == count


async def _held_is(settings: Settings, count: int) -> bool:
    return (await lag(settings)).held == count
