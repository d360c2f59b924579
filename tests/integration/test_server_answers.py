"""Answers of a server that is overloaded or set up otherwise: outages, never row failures."""

from dataclasses import replace
from pathlib import Path

import psycopg
from nats.aio.client import Client as NATS

from outbox_relay.config import Settings
from outbox_relay.embedded import EmbeddedNats
from outbox_relay.jetstream import connect_nats
from tests.helpers import (
    assert_exactly_once,
    drained,
    lag,
    producer_for,
    running_relay,
    stream_messages,
    wait_until,
)


def commit_events(settings: Settings, count: int) -> list[str]:
    """``count`` events of as many executions, in one transaction."""
    producer = producer_for(settings)
    with psycopg.connect(settings.database_url) as conn:
        return [
            str(producer.emit_event(conn, event_type="load", execution_id=i)) for i in range(count)
        ]


async def test_too_many_requests_is_an_outage_not_the_rows_fault(
    outbox: Settings, tmp_path: Path
) -> None:
    # A stream that queues few messages answers a pipelined batch with 429 (err_code
    # 10167) for the rest: backed off and sent again, never an attempt of the row.
    config = tmp_path / "nats.conf"
    config.write_text("jetstream { max_buffered_msgs: 50 }\n")
    with EmbeddedNats(extra_args=("-c", str(config))) as server:
        settings = replace(
            outbox, nats_urls=(server.url,), max_attempts=1, ordered=False, batch_size=150
        )
        ids = commit_events(settings, 300)
        async with running_relay(settings) as relay:
            await wait_until(lambda: drained(settings), within=60)
        assert (await lag(settings)).dead_letters == 0
        assert relay.stats.dead_lettered == relay.stats.retried == 0
        nc: NATS = await connect_nats(settings)
        try:
            assert_exactly_once(await stream_messages(nc, settings), ids)
        finally:
            await nc.close()
