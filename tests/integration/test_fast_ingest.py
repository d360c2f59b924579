"""Fast-ingest batch publish (nats-server 2.14): a claim stored as one flow-controlled
batch where the stream allows it, each message deduplicated on its own, a refused row
ending the batch without holding back anything but its key."""

from __future__ import annotations

from dataclasses import replace

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from outbox_relay.config import Settings
from outbox_relay.publish import FrameWriter, Publisher
from outbox_relay.store import OutboxMessage
from tests.helpers import (
    dead_letters,
    drained,
    fetch_all,
    lag,
    running_relay,
    stream_messages,
    wait_until,
)
from tests.integration.test_atomic_publish import (
    ROWS,
    _bad_row_in_another_stream,
    _batch_ids,
    _by_key,
    _dead_letters_are,
    _enqueue,
    _held_is,
    _ids,
    _sequences_increase_per_key,
)

pytestmark = pytest.mark.usefixtures("fast_server")


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_claim_is_stored_as_one_fast_batch_in_claim_order(
    outbox: Settings, nc: NATS, ordered: bool
) -> None:
    settings = replace(outbox, ordered=ordered)
    _enqueue(settings, ROWS)
    async with running_relay(settings) as relay:
        await wait_until(lambda: drained(settings))
        assert relay.stats.batches == 1
    stored = await stream_messages(nc, settings)
    # In claim order, key by key too: one message at a time, ordered, would go in
    # waves (each key's next row after its last one's PubAck) and interleave them.
    assert _ids(stored) == [msg_id for msg_id, _ in ROWS]
    assert _batch_ids(stored) == {None}  # no atomic batch's headers
    assert _sequences_increase_per_key(stored)
    # The relay created the stream, on a server that takes both kinds of batch.
    config = (await nc.jetstream().stream_info(settings.stream)).config
    assert config.allow_batched
    assert config.allow_atomic


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_claim_larger_than_the_flow_window_waits_for_the_servers_acks(
    outbox: Settings, nc: NATS, ordered: bool
) -> None:
    # The server grants at most 500 messages per flow ack, and the relay keeps two
    # windows unacknowledged: 2,500 rows take several.
    settings = replace(outbox, batch_size=2500, ordered=ordered)
    rows = [(f"big-{n}", str(n % 7)) for n in range(2500)]
    _enqueue(settings, rows)
    async with running_relay(settings) as relay:
        await wait_until(lambda: drained(settings))
        assert relay.stats.batches == 1
    stored = await stream_messages(nc, settings)
    assert _ids(stored) == [msg_id for msg_id, _ in rows]


async def test_a_stored_msg_id_is_a_duplicate_not_a_refused_batch(
    outbox: Settings, nc: NATS
) -> None:
    # As after a crash between the publish and the delete: r-7 is already stored.
    async with running_relay(outbox):  # the relay's own stream
        await wait_until(lambda: drained(outbox))
    await nc.jetstream().publish(
        f"{outbox.subject_prefix}.ok", b"{}", headers={"Nats-Msg-Id": "r-7"}
    )
    _enqueue(outbox, ROWS)
    async with running_relay(outbox) as relay:
        await wait_until(lambda: drained(outbox))
        assert relay.stats.batches == 1
        assert relay.stats.dead_lettered == relay.stats.retried == 0
    stored = await stream_messages(nc, outbox)
    # Deduplicated on its own; the rest of the batch stored in claim order around it.
    assert _ids(stored) == ["r-7", *(msg_id for msg_id, _ in ROWS if msg_id != "r-7")]


async def test_one_bad_row_ends_the_batch_and_holds_back_only_its_key(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, max_attempts=1)
    async with _bad_row_in_another_stream(settings, nc), running_relay(settings) as relay:
        await wait_until(lambda: _dead_letters_are(settings, 1))
        await wait_until(lambda: _held_is(settings, 1))
        assert relay.stats.batches == 1  # the rows behind it went in the same claim
    stored = await stream_messages(nc, settings)
    # x-2 waits behind the dead letter (hold); the rest went out in claim order.
    assert _ids(stored) == ["x-1", "y-1", "k-1", "y-2", "k-2"]
    assert (await lag(settings)).pending == 1
    # Sent on its own, outside any batch: the server's own reason, not the other
    # stream's answer to a batch it does not take.
    assert await _dead_letter_reasons(settings) == [
        ("x-bad", "JetStream refused the message: expected stream does not match (err_code 10060)")
    ]


async def test_a_stream_that_refuses_fast_batches_gets_every_row_once(
    outbox: Settings, nc: NATS
) -> None:
    js = nc.jetstream()
    # Told the stream takes fast batches when it does not (its config changed since).
    await js.add_stream(StreamConfig(name=outbox.stream, subjects=[outbox.subject_wildcard]))
    publisher = Publisher(nc, js, outbox.stream, 3.0, ordered=True, fast=True)
    await publisher.start()
    rows = [
        OutboxMessage(n, msg_id, f"{outbox.subject_prefix}.ok", b"{}", None, key, n)
        for n, (msg_id, key) in enumerate(ROWS, start=1)
    ]
    result = await publisher.publish_batch(rows)
    assert not publisher.fast  # it stopped trying
    assert sorted(result.published) == [row.id for row in rows]
    assert result.failures == []
    assert result.transient == 0
    stored = await stream_messages(nc, outbox)
    assert _by_key(_ids(stored), ROWS) == _by_key([m for m, _ in ROWS], ROWS)


async def test_a_row_the_stream_refuses_mid_batch_is_dead_lettered_alone(
    outbox: Settings, nc: NATS
) -> None:
    settings = replace(outbox, max_attempts=1)
    # The operator's stream stores messages of at most 1 KiB: the server refuses the
    # big row inside the batch (err_code 10054), which ends the batch there.
    await nc.jetstream().add_stream(
        StreamConfig(
            name=settings.stream,
            subjects=[settings.subject_wildcard],
            allow_batched=True,
            max_msg_size=1024,
        )
    )
    _enqueue(settings, [("x-1", "x"), ("y-1", "y"), ("k-1", None)])
    _enqueue(settings, [("x-big", "x")], payload=b"[" + b"0," * 1000 + b"0]")
    _enqueue(settings, [("x-2", "x"), ("y-2", "y"), ("k-2", None)])
    async with running_relay(settings) as relay:
        await wait_until(lambda: _dead_letters_are(settings, 1))
        await wait_until(lambda: _held_is(settings, 1))
        assert relay.stats.batches == 1
    stored = await stream_messages(nc, settings)
    assert _ids(stored) == ["x-1", "y-1", "k-1", "y-2", "k-2"]
    assert await _dead_letter_reasons(settings) == [
        (
            "x-big",
            "JetStream refused the message: message size exceeds maximum allowed (err_code 10054)",
        )
    ]


async def _dead_letter_reasons(settings: Settings) -> list[tuple[object, ...]]:
    rows = await fetch_all(settings, dead_letters(settings))
    return [(event_id, reason) for event_id, _, _, reason in rows]


async def test_batches_go_to_nats_py_in_one_write_each(nc: NATS) -> None:
    """The batch paths hand their frames to nats-py's write buffer, whose internals a
    nats-py upgrade may change: then they would quietly fall back to a publish per
    message, slower. This says so instead."""
    assert FrameWriter(nc).batched
