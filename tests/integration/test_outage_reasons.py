"""An outage's log line says what is wrong, not only that something is."""

import logging
from dataclasses import replace

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.schema import migrate
from tests.conftest import make_settings
from tests.helpers import running_relay, wait_until
from tests.servers import Servers


async def test_a_dropped_database_is_named_in_the_relays_own_warning(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    settings: Settings = make_settings(servers)
    dbname = settings.schema  # a database of its own, to drop under the relay
    with psycopg.connect(servers.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    settings = replace(settings, database_url=make_conninfo(servers.database_url, dbname=dbname))
    async with await connect_postgres(settings) as conn:
        await migrate(conn, settings.names, create_event_table=True)

    def relay_warns_why() -> bool:
        return any(
            r.name == "outbox_relay.relay"
            and "PostgreSQL unavailable" in r.getMessage()
            and f'database "{dbname}" does not exist' in r.getMessage()
            for r in caplog.records
        )

    with caplog.at_level(logging.WARNING):
        async with running_relay(settings):
            with psycopg.connect(servers.database_url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname))
                )

            async def warned() -> bool:
                return relay_warns_why()

            await wait_until(warned, within=30)
    with psycopg.connect(servers.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
