"""Atomic batch publish: a claim stored as one batch where the stream allows it, one
message at a time for a batch refused whole and on servers without it (nats-server 2.9).

The streams here allow atomic batches only, as an operator's may: one the relay creates
on nats-server 2.14 or later also allows fast-ingest batches, which it prefers
(tests/integration/test_fast_ingest.py)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from psycopg import sql
from psycopg.types.json import Jsonb

from outbox_relay.atomic import BATCH_ID_HEADER
from outbox_relay.config import Settings
from outbox_relay.embedded import EmbeddedNats
from outbox_relay.jetstream import BatchSupport, connect_nats, ensure_stream
from outbox_relay.publish import Publisher
from outbox_relay.store import OutboxMessage
from tests.helpers import drained, lag, producer_for, running_relay, stream_messages, wait_until

Rows = Sequence[tuple[str, str | None]]  # (msg id, ordering key)
# Rows as a producer interleaves them: a hot key, a quieter one, and keyless rows.
ROWS = [(f"r-{n}", ("hot" if n % 3 else "calm") if n % 5 else None) for n in range(1, 31)]


def _enqueue(settings: Settings, rows: Rows, subject: str = "", payload: bytes = b"{}") -> None:
    producer = producer_for(settings)
    with psycopg.connect(settings.database_url) as conn:  # one commit: one claim sees all
        for msg_id, key in rows:
            producer.enqueue(
                conn,
                subject=subject or f"{settings.subject_prefix}.ok",
                payload=payload,
                msg_id=msg_id,
                ordering_key=key,
            )


def _ids(messages: list[Msg]) -> list[str]:
    return [m.headers["Nats-Msg-Id"] for m in messages if m.headers]


def _by_key(msg_ids: list[str], rows: Rows) -> dict[str | None, list[str]]:
    """``msg_ids`` grouped by the key of their row, each group in the given order."""
    key_of = dict(rows)
    grouped: dict[str | None, list[str]] = {}
    for msg_id in msg_ids:
        grouped.setdefault(key_of[msg_id], []).append(msg_id)
    return grouped


def _batch_ids(messages: list[Msg]) -> set[str | None]:
    return {(m.headers or {}).get(BATCH_ID_HEADER) for m in messages}


def _sequences_increase_per_key(messages: list[Msg]) -> bool:
    last: dict[str, int] = {}
    for m in messages:
        headers = m.headers or {}
        if (key := headers.get("Outbox-Ordering-Key")) is not None:
            sequence = int(headers["Outbox-Sequence"])
            if sequence <= last.get(key, -1):
                return False
            last[key] = sequence
    return True


@contextlib.asynccontextmanager
async def _bad_row_in_another_stream(settings: Settings, nc: NATS) -> AsyncIterator[None]:
    """Rows of keys x, y and keyless, x-bad among them, whose subject another stream
    binds (Nats-Expected-Stream refuses it); the other stream is gone afterwards."""
    other = f"{settings.stream}_other"
    js = nc.jetstream()
    await js.add_stream(name=other, subjects=[f"{other}.>"])
    try:
        _enqueue(settings, [("x-1", "x"), ("y-1", "y"), ("k-1", None)])
        _enqueue(settings, [("x-bad", "x")], subject=f"{other}.taken")
        _enqueue(settings, [("x-2", "x"), ("y-2", "y"), ("k-2", None)])
        yield
    finally:
        await js.delete_stream(other)


@pytest.fixture
async def atomic_stream(outbox: Settings, nc: NATS, atomic_server: None) -> None:
    """The stream, allowing atomic batches and no others."""
    await ensure_stream(nc.jetstream(), outbox, batches=BatchSupport(atomic=True))


@pytest.mark.usefixtures("atomic_stream")
async def test_a_claim_is_stored_as_one_atomic_batch_in_order(outbox: Settings, nc: NATS) -> None:
    _enqueue(outbox, ROWS)
    async with running_relay(outbox):
        await wait_until(lambda: drained(outbox))
    stored = await stream_messages(nc, outbox)
    assert _ids(stored) == [msg_id for msg_id, _ in ROWS]
    assert len(_batch_ids(stored) - {None}) == 1  # one claim, one batch, one PubAck
    assert _sequences_increase_per_key(stored)


@pytest.mark.usefixtures("atomic_stream")
@pytest.mark.parametrize("ordered", [True, False])
async def test_a_claim_over_the_server_limit_is_split_into_full_batches(
    outbox: Settings, nc: NATS, ordered: bool
) -> None:
    settings = replace(outbox, batch_size=2500, ordered=ordered)
    rows = [(f"big-{n}", str(n % 7)) for n in range(2500)]
    _enqueue(settings, rows)
    async with running_relay(settings):
        await wait_until(lambda: drained(settings))
    stored = await stream_messages(nc, settings)
    assert _by_key(_ids(stored), rows) == _by_key([m for m, _ in rows], rows)
    # 1,000 messages a batch, the server's limit: none went one by one.
    assert None not in _batch_ids(stored)
    assert len(_batch_ids(stored)) == 3


@pytest.mark.usefixtures("atomic_stream")
async def test_a_batch_refused_for_a_stored_msg_id_goes_one_by_one(
    outbox: Settings, nc: NATS
) -> None:
    # As after a crash between the publish and the delete: r-7 is already stored.
    await nc.jetstream().publish(
        f"{outbox.subject_prefix}.ok", b"{}", headers={"Nats-Msg-Id": "r-7"}
    )
    _enqueue(outbox, ROWS)
    async with running_relay(outbox) as relay:
        await wait_until(lambda: drained(outbox))
        assert relay.stats.duplicates == 1
        assert relay.stats.dead_lettered == relay.stats.retried == 0
        # The refusal is the batch's, not the path's: the next claim is a batch again.
        _enqueue(outbox, [("later-1", "hot"), ("later-2", None)])
        await wait_until(lambda: drained(outbox))
    stored = await stream_messages(nc, outbox)
    assert _ids(stored)[0] == "r-7"
    # One by one, in waves: each key's rows in order (keys may interleave otherwise).
    again = [(m, k) for m, k in ROWS if m != "r-7"]
    assert _by_key(_ids(stored[1:-2]), again) == _by_key([m for m, _ in again], again)
    assert _ids(stored[-2:]) == ["later-1", "later-2"]
    assert _sequences_increase_per_key(stored)
    assert _batch_ids(stored[1:-2]) == {None}  # sent one by one
    assert None not in _batch_ids(stored[-2:])


@pytest.mark.usefixtures("atomic_stream")
async def test_one_bad_row_refuses_its_batch_and_holds_back_only_its_key(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, max_attempts=1)
    async with _bad_row_in_another_stream(settings, nc), running_relay(settings):
        await wait_until(lambda: _dead_letters_are(settings, 1))
        await wait_until(lambda: _held_is(settings, 1))
    stored = await stream_messages(nc, settings)
    # x-2 waits behind the dead letter (hold); everything else went out, each key in order.
    sent = [("x-1", "x"), ("y-1", "y"), ("k-1", None), ("y-2", "y"), ("k-2", None)]
    assert _by_key(_ids(stored), sent) == _by_key([m for m, _ in sent], sent)
    assert _batch_ids(stored) == {None}
    assert (await lag(settings)).pending == 1


@pytest.mark.usefixtures("atomic_stream")
async def test_a_row_that_cannot_be_sent_holds_back_its_key_in_the_batch(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, max_attempts=1)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        # Written before the constraints existed: the relay cannot send its header.
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT event_outbox_headers_valid").format(
                sql.Identifier(settings.schema, "event_outbox")
            )
        )
        _enqueue(settings, [("k-1", "k"), ("j-1", "j")])
        conn.execute(
            sql.SQL("SELECT {}.event_outbox_enqueue(%s, %s, %s, %s, NULL, %s)").format(
                sql.Identifier(settings.schema)
            ),
            (f"{settings.subject_prefix}.ok", b"{}", "k-bad", Jsonb({"x-retry": 1}), "k"),
        )
        _enqueue(settings, [("k-2", "k"), ("j-2", "j"), ("free", None)])
    async with running_relay(settings):
        await wait_until(lambda: _dead_letters_are(settings, 1))
        await wait_until(lambda: _held_is(settings, 1))
    stored = await stream_messages(nc, settings)
    assert _ids(stored) == ["k-1", "j-1", "j-2", "free"]  # k-2 waits behind k-bad
    assert len(_batch_ids(stored) - {None}) == 1
    assert None not in _batch_ids(stored)


async def _dead_letters_are(settings: Settings, count: int) -> bool:
    return (await lag(settings)).dead_letters == count


async def _held_is(settings: Settings, count: int) -> bool:
    return (await lag(settings)).held == count


def _old_server_binary() -> Path | None:
    """A nats-server from before atomic batch publish, installed on the machine."""
    found = shutil.which("nats-server", path="/usr/local/bin:/usr/bin:/usr/sbin:/bin")
    if found is None:
        return None
    version = subprocess.run(
        [found, "--version"], capture_output=True, text=True, check=False
    ).stdout
    return Path(found) if "v2.9." in version or "v2.10." in version else None


@pytest.fixture(scope="module")
def old_nats() -> Iterator[EmbeddedNats]:
    binary = _old_server_binary()
    if binary is None:
        pytest.skip("no nats-server older than 2.12 installed")
    with EmbeddedNats(binary=binary) as server:
        yield server


async def test_a_server_without_atomic_publish_gets_one_message_at_a_time(
    outbox: Settings, old_nats: EmbeddedNats
) -> None:
    settings = replace(outbox, nats_urls=(old_nats.url,))
    _enqueue(settings, ROWS)
    async with running_relay(settings):
        await wait_until(lambda: drained(settings))
    old = await connect_nats(settings)
    try:
        stored = await stream_messages(old, settings)
        assert not (await old.jetstream().stream_info(settings.stream)).config.allow_atomic
        await old.jetstream().delete_stream(settings.stream)
    finally:
        await old.close()
    assert _by_key(_ids(stored), ROWS) == _by_key([m for m, _ in ROWS], ROWS)
    assert _batch_ids(stored) == {None}
    assert _sequences_increase_per_key(stored)


async def test_a_server_that_ignores_batch_headers_still_gets_every_row_once(
    outbox: Settings, old_nats: EmbeddedNats
) -> None:
    settings = replace(outbox, nats_urls=(old_nats.url,))
    old = await connect_nats(settings)
    try:
        js = old.jetstream()
        await ensure_stream(js, settings)
        # Told the server takes batches when it does not (a cluster of mixed versions).
        publisher = Publisher(old, js, settings.stream, 3.0, ordered=True, atomic=True)
        await publisher.start()
        rows = [
            OutboxMessage(n, msg_id, f"{settings.subject_prefix}.ok", b"{}", None, key, n)
            for n, (msg_id, key) in enumerate(ROWS, start=1)
        ]
        result = await publisher.publish_batch(rows)
        stored = await stream_messages(old, settings)
        await js.delete_stream(settings.stream)
    finally:
        await old.close()
    assert sorted(result.published) == [row.id for row in rows]
    assert not publisher.atomic  # it noticed the PubAck was not a batch's
    assert _ids(stored) == [msg_id for msg_id, _ in ROWS]  # once each: msg ids dedup
