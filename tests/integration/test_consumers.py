"""Durable consumers declared in the configuration: created if absent, never changed."""

from __future__ import annotations

from dataclasses import replace

from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig

from outbox_relay.config import DurableConsumer, Settings
from outbox_relay.jetstream import ensure_stream


async def test_declared_consumers_are_created_if_absent_and_never_changed(
    unmigrated: Settings, nc: NATS
) -> None:
    prefix = unmigrated.subject_prefix
    settings = replace(
        unmigrated,
        consumers=(
            # NoETL's three, under this test's prefix.
            DurableConsumer("noetl_projector", f"{prefix}.>"),
            DurableConsumer("noetl_materializer", f"{prefix}.>", "explicit"),
            DurableConsumer("noetl_result_materializer", f"{prefix}.>"),
        ),
    )
    js = nc.jetstream()
    await ensure_stream(js, replace(settings, consumers=()))
    # One exists already, as NoETL's publisher made it, with another filter.
    await js.add_consumer(
        settings.stream,
        ConsumerConfig(
            durable_name="noetl_projector",
            filter_subject=f"{prefix}.command.>",
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    status = await ensure_stream(js, settings)
    assert status.consumers_created == ["noetl_materializer", "noetl_result_materializer"]
    assert any("noetl_projector" in w and "left as it is" in w for w in status.warnings)
    for name in ("noetl_materializer", "noetl_result_materializer"):
        info = await js.consumer_info(settings.stream, name)
        assert info.config.durable_name == name
        assert info.config.filter_subject == f"{prefix}.>"
        assert info.config.ack_policy == AckPolicy.EXPLICIT
    kept = await js.consumer_info(settings.stream, "noetl_projector")
    assert kept.config.filter_subject == f"{prefix}.command.>"
    # Again: nothing to create, nothing changed.
    assert (await ensure_stream(js, settings)).consumers_created == []
