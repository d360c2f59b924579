"""Ordered delivery: each key's rows reach the stream in causal order, across relays,
without producers waiting for each other."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.to_thread
import orjson
import psycopg
import pytest
from nats.aio.client import Client as NATS
from psycopg import sql

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.dead_letters import DeadLetterFilter, purge_dead_letters
from outbox_relay.partitions import PartitionOwner, plan, preference
from outbox_relay.producer import Producer
from outbox_relay.queries import KEY_PARTITIONS
from outbox_relay.store import ClaimScope, OutboxStore, RetryPolicy
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
        "unkeyed": 0,
        "collided": 0,
        "rolled_back_by_failover": 0,
        "clean": True,
        "timeline": 1,  # the test servers are never promoted
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


async def test_writers_of_one_key_never_wait_and_the_stream_follows_commit_order(
    outbox: Settings, nc: NATS
) -> None:
    """A transaction that keeps a key's event open does not hold up the key's other
    writers (issue: same-key writers waited for each other's whole transaction); the
    later-committed row is published after the earlier-committed one."""
    producer = producer_for(outbox)
    async with running_relay(outbox):
        with (
            psycopg.connect(outbox.database_url) as quick,
            # Left first, so a failed check cannot leave quick blocked behind it.
            psycopg.connect(outbox.database_url) as slow,
        ):
            producer.emit_event(slow, event_type="a", execution_id=9, event_id=1000)
            started = time.monotonic()
            with anyio.fail_after(1):  # used to wait for the slow transaction's commit
                await anyio.to_thread.run_sync(
                    lambda: producer.emit_event(
                        quick, event_type="b", execution_id=9, event_id=2000
                    ),
                    abandon_on_cancel=True,
                )
                await anyio.to_thread.run_sync(quick.commit, abandon_on_cancel=True)
            assert time.monotonic() - started < 1
            await wait_until(lambda: _stored_is(nc, outbox, ["2000"]))
            slow.commit()
        await wait_until(lambda: drained(outbox))
    assert await _stored(nc, outbox) == ["2000", "1000"]  # commit order, not id order
    assert (await verified(outbox, nc)).clean


async def test_an_event_written_after_seeing_another_is_published_after_it(
    outbox: Settings, nc: NATS
) -> None:
    """Causal order, the relay catching up afterwards: the later transaction began (and
    wrote an event) before the earlier one, then read its commit and wrote another."""
    producer = producer_for(outbox)
    with (
        psycopg.connect(outbox.database_url) as later,
        psycopg.connect(outbox.database_url) as earlier,
    ):
        producer.emit_event(later, event_type="first", execution_id=5, event_id=10)
        producer.emit_event(earlier, event_type="cause", execution_id=5, event_id=20)
        earlier.commit()
        seen = later.execute(
            sql.SQL("SELECT event_id FROM {} WHERE event_id = 20").format(
                sql.Identifier(outbox.schema, "event")
            )
        ).fetchall()
        assert seen == [(20,)]
        producer.emit_event(later, event_type="effect", execution_id=5, event_id=30)
        later.commit()
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
    stored = await _stored(nc, outbox)
    assert stored.index("20") < stored.index("30"), stored
    assert (await verified(outbox, nc)).clean


def _multi_key_transactions(settings: Settings, seconds: float) -> tuple[int, int, list[str]]:
    """The deadlock pattern: 4 writers, each transaction 50 events over 7 executions,
    half of the writers walking the executions in the opposite order."""
    producer = producer_for(settings)
    committed = [0]
    aborted: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def write(worker: int) -> None:
        executions = list(range(7)) if worker % 2 else list(range(6, -1, -1))
        with psycopg.connect(settings.database_url) as conn:
            while time.monotonic() < deadline:
                try:
                    with conn.transaction():
                        for n in range(50):
                            producer.emit_event(
                                conn,
                                event_type="batch.result",
                                execution_id=executions[n % 7],
                                node_id=f"{worker}-{n}",
                            )
                except psycopg.Error as exc:
                    with lock:
                        aborted.append(type(exc).__name__)
                else:
                    with lock:
                        committed[0] += 1

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return committed[0], len(aborted), aborted[:5]


@pytest.mark.slow
async def test_transactions_over_several_keys_in_any_order_never_deadlock(
    outbox: Settings, nc: NATS
) -> None:
    async with running_relay(outbox, "a"), running_relay(outbox, "b"):
        committed, aborted, reasons = await anyio.to_thread.run_sync(
            _multi_key_transactions, outbox, 60.0
        )
        await wait_until(lambda: drained(outbox), within=120)
    assert aborted == 0, reasons
    assert committed > 0
    report = await verified(outbox, nc)
    assert report.ok == committed * 50
    assert report.clean, report.as_dict()


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


async def test_a_key_failing_in_one_batch_keeps_order_in_the_batch_claimed_meanwhile(
    outbox: Settings, nc: NATS
) -> None:
    """The next batch is claimed while this one publishes: when a row of this batch
    fails, the later rows of its key in both batches wait and go out after it, in order
    (skip policy: the row is dead-lettered at once and its key flows on)."""
    settings = replace(outbox, batch_size=4, max_attempts=1, dead_letter_policy="skip")
    good = f"{settings.subject_prefix}.ok"
    expected = []
    for n in range(40):
        if n == 2:
            _enqueue(settings, "nobody.listens", "x-poison", "x")
        _enqueue(settings, good, f"x-{n}", "x")
        expected.append(f"x-{n}")
    async with running_relay(settings):
        await wait_until(lambda: drained(settings))
    assert await _stored(nc, settings) == expected
    assert (await lag(settings)).dead_letters == 1
    assert (await verified(settings, nc)).out_of_order == []


async def test_a_relay_gives_partitions_back_only_with_no_batch_in_flight(
    outbox: Settings, nc: NATS
) -> None:
    """A relay draining a key, its publishes slowed down, sees a second relay join and
    gives that key's partition over: not while a batch of the key is in flight, or the
    newcomer would publish the key's later rows first."""
    settings = replace(outbox, batch_size=5)
    given_back = plan(frozenset(range(KEY_PARTITIONS)), 2, preference("a")).release
    key = await _key_in(settings, given_back)
    good = f"{settings.subject_prefix}.ok"
    expected = [f"{key}-{n}" for n in range(120)]
    for msg_id in expected:
        _enqueue(settings, good, msg_id, key)
    async with running_relay(settings, "a") as a:
        publisher = a._publisher
        assert publisher is not None
        publish = publisher.publish_batch

        async def slowly(messages: Any, **kwargs: Any) -> Any:
            await anyio.sleep(0.2)
            return await publish(messages, **kwargs)

        publisher.publish_batch = slowly  # type: ignore[method-assign]
        await wait_until(lambda: _stored_count_at_least(nc, settings, 10))
        async with running_relay(settings, "b") as b:
            await wait_until(lambda: drained(settings))
    assert b.stats.published > 0  # the key did change hands
    assert await _stored(nc, settings) == expected


async def _key_in(settings: Settings, partitions: Sequence[int]) -> str:
    async with await connect_postgres(settings, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT k FROM (SELECT 'k' || g AS k FROM generate_series(1, 1000) g) keys"
            " WHERE (hashtext(k) & 63) = ANY(%s) LIMIT 1",
            (list(partitions),),
        )
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _stored_count_at_least(nc: NATS, settings: Settings, count: int) -> bool:
    return len(await _stored(nc, settings)) >= count


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


@pytest.mark.parametrize(
    "partitions",
    [{0}, {63}, {0, 31, 32, 63}, set(range(0, 64, 3)), set(range(KEY_PARTITIONS))],
    ids=["first", "last (the sign bit)", "edges", "every third", "all"],
)
async def test_a_claim_takes_exactly_the_rows_of_its_partitions(
    outbox: Settings, partitions: set[int]
) -> None:
    """The claim tests a row's partition against the scope's partitions as bits of one
    bigint: every partition, the sign bit's too, must map to its own rows."""
    key_of = {p: await _key_in(outbox, [p]) for p in range(KEY_PARTITIONS)}
    for key in key_of.values():
        _enqueue(outbox, f"{outbox.subject_prefix}.ok", f"{key}-1", key)
    store = OutboxStore(outbox.names, RetryPolicy())
    async with await connect_postgres(outbox) as conn:
        scope = ClaimScope(ordered=True, partitions=frozenset(partitions))
        claimed = await store.claim(conn, 1000, scope)
        await conn.rollback()
    assert {m.ordering_key for m in claimed} == {key_of[p] for p in partitions}


async def test_a_second_session_claims_only_partitions_its_owner_holds(outbox: Settings) -> None:
    """On a relay's second session a claim takes only the partitions the first session
    holds. That session's other advisory locks (membership, idle) share the partition
    locks' object: they must not pass for partitions."""
    key_of = {p: await _key_in(outbox, [p]) for p in range(KEY_PARTITIONS)}
    for key in key_of.values():
        _enqueue(outbox, f"{outbox.subject_prefix}.ok", f"{key}-1", key)
    store = OutboxStore(outbox.names, RetryPolicy())
    async with (
        await connect_postgres(outbox) as owner,
        await connect_postgres(outbox) as second,
    ):
        await store.join_relays(owner)
        assert await store.take_idle_lock(owner)
        held = await store.take_partitions(owner, [5, 63], 2)
        scope = ClaimScope(
            ordered=True,
            partitions=frozenset(range(KEY_PARTITIONS)),
            owner_pid=owner.info.backend_pid,
        )
        claimed = await store.claim(second, 1000, scope)
        await second.rollback()
    assert (
        {m.ordering_key for m in claimed}
        == {key_of[p] for p in held}
        == {
            key_of[5],
            key_of[63],
        }
    )


def _enqueue_backlog(settings: Settings, keys: int, each: int, payload_bytes: int) -> list[str]:
    """``keys * each`` rows inserted by one statement through the SQL function, each
    key's rows interleaved with the others' in id order; returns msg ids in id order."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "SELECT {}.event_outbox_enqueue(%(subject)s, convert_to(repeat('x', %(size)s),"
                " 'UTF8'), 'k' || (n %% %(keys)s) || '-' || (n / %(keys)s), NULL, NULL,"
                " 'k' || (n %% %(keys)s)) FROM generate_series(0, %(rows)s - 1) AS n ORDER BY n"
            ).format(sql.Identifier(settings.schema)),
            {
                "subject": f"{settings.subject_prefix}.ok",
                "size": payload_bytes,
                "keys": keys,
                "rows": keys * each,
            },
        )
    return [f"k{n % keys}-{n // keys}" for n in range(keys * each)]


def _per_key(msg_ids: Sequence[str]) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = defaultdict(list)
    for msg_id in msg_ids:
        by_key[msg_id.rsplit("-", 1)[0]].append(msg_id)
    return dict(by_key)


async def test_a_partition_taken_over_is_not_claimed_while_its_old_owner_holds_rows(
    outbox: Settings,
) -> None:
    """A relay's main session (holding its partitions) dies first while its second
    session still holds claimed rows: the relay taking the partitions over must not
    claim past those rows, taking their keys' later rows, until they are let go."""
    _enqueue_backlog(outbox, keys=2, each=4, payload_bytes=10)
    store = OutboxStore(outbox.names, RetryPolicy())
    every = frozenset(range(KEY_PARTITIONS))
    async with (
        await connect_postgres(outbox) as old_main,
        await connect_postgres(outbox) as old_second,
        await connect_postgres(outbox) as new_main,
    ):
        await store.join_relays(old_main)
        assert len(await store.take_partitions(old_main, sorted(every), KEY_PARTITIONS)) == 64
        on_second = ClaimScope(ordered=True, partitions=every, owner_pid=old_main.info.backend_pid)
        held = await store.claim(old_second, 3, on_second)
        assert [m.event_id for m in held] == ["k0-0", "k1-0", "k0-1"]
        await new_main.execute("SELECT pg_terminate_backend(%s)", (old_main.info.backend_pid,))
        await new_main.commit()
        owner = PartitionOwner(store, "new")
        await owner.join(new_main)
        await owner.rebalance(new_main, settled=True)
        assert owner.owned == every
        taken = await store.claim(new_main, 100, ClaimScope(True, owner.claimable))
        await new_main.rollback()
        assert taken == []  # both keys' partitions are contested
        await old_second.rollback()  # the old owner's rows are let go
        await owner.rebalance(new_main, settled=True)
        taken = await store.claim(new_main, 100, ClaimScope(True, owner.claimable))
        await new_main.rollback()
    assert [m.event_id for m in taken] == [f"k{n % 2}-{n // 2}" for n in range(8)]


@pytest.mark.parametrize(("payload_bytes", "max_bytes"), [(12_000, None), (1_100, 20_000)])
async def test_a_byte_bounded_backlog_keeps_every_key_in_order(
    outbox: Settings, nc: NATS, payload_bytes: int, max_bytes: int | None
) -> None:
    """A backlog written by one statement over a few keys, batches cut by bytes before
    rows (the default budget with 12 KB rows, or a small budget): each key's rows reach
    the stream in id order."""
    settings = outbox if max_bytes is None else replace(outbox, batch_max_bytes=max_bytes)
    expected = _enqueue_backlog(settings, keys=20, each=200, payload_bytes=payload_bytes)
    async with running_relay(settings):
        await wait_until(lambda: drained(settings), within=120)
    stored = await _stored(nc, settings)
    assert sorted(stored) == sorted(expected)
    assert _per_key(stored) == _per_key(expected)
