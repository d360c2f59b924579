"""``outbox-relay demo``: events flowing end to end on a machine with nothing but Python.

Uses the configured servers when there are any (``OUTBOX_DATABASE_URL`` or ``PG*``,
``OUTBOX_NATS_URL``), otherwise starts embedded ones from the wheels.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import ExitStack

import anyio
import click
from nats.js import JetStreamContext

from outbox_relay.config import Settings, redact_url, split_nats_urls
from outbox_relay.database import connect_postgres, connected_to
from outbox_relay.embedded import EmbeddedNats, EmbeddedPostgres
from outbox_relay.errors import OutboxError
from outbox_relay.jetstream import connect_nats, read_stream
from outbox_relay.producer import Producer
from outbox_relay.publish import MSG_ID_HEADER
from outbox_relay.queries import query
from outbox_relay.relay import Relay
from outbox_relay.schema import migrate
from outbox_relay.store import OutboxStore, RetryPolicy

EVENT_TYPES = (
    "playbook.started",
    "command.issued",
    "command.claimed",
    "command.completed",
    "step.exit",
    "playbook.completed",
)
_ARRIVAL_TIMEOUT = 60.0


def _postgres_configured() -> bool:
    return any(os.environ.get(v) for v in ("OUTBOX_DATABASE_URL", "PGHOST", "PGSERVICE"))


async def run_demo(*, events: int, producers: int) -> None:
    if events < 1 or producers < 1:
        raise OutboxError("--events and --producers must be at least 1")
    with ExitStack() as stack:
        database_url = os.environ.get("OUTBOX_DATABASE_URL", "")
        # A throw-away server gets a standalone event table; a configured one only as
        # `migrate` would give it one (NoETL's table, or --create-event-table).
        create_event_table = True
        if not _postgres_configured():
            pg = stack.enter_context(EmbeddedPostgres())
            database_url = pg.url
            click.echo(f"postgres  embedded PostgreSQL {pg.version} ({pg.url})")
        else:
            create_event_table = _flag("OUTBOX_CREATE_EVENT_TABLE")
            click.echo("postgres  configured server")
        nats_env = os.environ.get("OUTBOX_NATS_URL", "")
        if nats_env:
            nats_urls = split_nats_urls(nats_env)
            click.echo(f"nats      {', '.join(redact_url(u) for u in nats_urls)}")
        else:
            nats = stack.enter_context(EmbeddedNats())
            nats_urls = (nats.url,)
            click.echo(f"nats      embedded nats-server on {nats.url}")
        settings = Settings(
            database_url=database_url,
            nats_urls=nats_urls,
            schema=os.environ.get("OUTBOX_SCHEMA", "noetl"),
            stream=os.environ.get("OUTBOX_STREAM", "noetl_events"),
            subject_prefix=os.environ.get("OUTBOX_SUBJECT_PREFIX", "noetl.events"),
        )
        await _demo(
            settings, events=events, producers=producers, create_event_table=create_event_table
        )


def _flag(variable: str) -> bool:
    """An on/off environment variable, read as click reads the flag it stands for."""
    return os.environ.get(variable, "").strip().lower() in {"1", "true", "t", "yes", "y", "on"}


async def _demo(
    settings: Settings, *, events: int, producers: int, create_event_table: bool
) -> None:
    async with await connect_postgres(settings) as conn:
        applied = await migrate(conn, settings.names, create_event_table=create_event_table)
        target = connected_to(conn)
    click.echo(
        f"schema    {settings.schema} in database {target}: "
        f"{'migrated' if applied else 'already migrated'}"
    )
    click.echo(f"events    {events} demo events into its event table and stream {settings.stream}")

    relay = Relay(settings, relay_id="demo")
    nc = await connect_nats(settings, name="outbox-relay demo")
    js = nc.jetstream()
    producer = Producer(schema=settings.schema, subject_prefix=settings.subject_prefix)
    emitted: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run)
            await relay.wait_started()
            click.echo(f"relay     started; emitting {events} events from {producers} producers")
            before = (await js.stream_info(settings.stream)).state.messages
            started = time.monotonic()
            async with anyio.create_task_group() as producers_group:
                for worker in range(producers):
                    share = events // producers + (worker < events % producers)
                    producers_group.start_soon(_produce, settings, producer, worker, share, emitted)
                producers_group.start_soon(_watch, settings, js, events, before, emitted)
            elapsed = time.monotonic() - started
            relay.stop()

        messages = await read_stream(js, settings.stream, subject=settings.subject_wildcard)
        ids = {int(m.header[MSG_ID_HEADER]) for m in messages if m.header}
        missing = set(emitted) - ids
        if missing:
            raise OutboxError(f"{len(missing)} events did not reach the stream")
        sample = messages[-1]
        click.echo(
            f"done      {events} events committed and in stream {settings.stream} exactly "
            f"once in {elapsed:.2f}s"
        )
        msg_id = (sample.header or {}).get(MSG_ID_HEADER)
        click.echo(f"sample    {sample.subject}  {MSG_ID_HEADER}: {msg_id}")
        click.echo(f"          {sample.data[:150].decode(errors='replace')}...")
    finally:
        await nc.close()


async def _produce(
    settings: Settings, producer: Producer, worker: int, count: int, emitted: list[int]
) -> None:
    rng = random.Random()  # noqa: S311 - demo data
    async with await connect_postgres(settings, autocommit=False) as conn:
        execution_id = time.time_ns() // 1000 + worker  # one execution per producer
        for i in range(count):
            async with conn.transaction():
                event_id = await producer.emit_event_async(
                    conn,
                    event_type=EVENT_TYPES[i % len(EVENT_TYPES)],
                    execution_id=execution_id,
                    node_name=f"step_{i % 7}",
                    status="COMPLETED",
                    context={"attempt": 1, "worker": rng.randint(1, 8)},
                )
            emitted.append(event_id)
            await anyio.sleep(rng.uniform(0, 0.01))


async def _watch(
    settings: Settings, js: JetStreamContext, events: int, before: int, emitted: list[int]
) -> None:
    store = OutboxStore(settings.names, RetryPolicy())
    own_pending = query("count_pending_ids", settings.names)
    deadline = time.monotonic() + _ARRIVAL_TIMEOUT
    async with await connect_postgres(settings, autocommit=True) as conn:
        while True:
            lag = await store.lag(conn)
            # Our own events only: on configured servers others may be pending too.
            cur = await conn.execute(own_pending, {"ids": [str(i) for i in emitted]})
            row = await cur.fetchone()
            pending = int(row[0]) if row else 0
            in_stream = (await js.stream_info(settings.stream)).state.messages - before
            click.echo(
                f"progress  committed {len(emitted):>5}   in stream {in_stream:>5}   "
                f"pending {pending:>5}   oldest {lag.oldest_age_seconds * 1000:7.1f} ms"
            )
            if len(emitted) == events and pending == 0:
                return
            if time.monotonic() > deadline:
                raise OutboxError("events did not all arrive within 60s; see the relay log")
            await anyio.sleep(0.25)
