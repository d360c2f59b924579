"""Schema commands: migrate, roles."""

from __future__ import annotations

from typing import Any

import click

from outbox_relay.cli.options import (
    DATABASE_OPTIONS,
    option,
    run_async,
    settings_from,
    with_options,
)
from outbox_relay.database import connect_postgres, connected_to
from outbox_relay.queries import ROLE_PURPOSES
from outbox_relay.schema import grant_roles, latest_version, migrate


@click.command("migrate")
@with_options(DATABASE_OPTIONS)
@option(
    "--create-event-table",
    envvar="OUTBOX_CREATE_EVENT_TABLE",
    is_flag=True,
    default=False,
    help="On a first run without NoETL's event table, create a standalone one.",
)
def migrate_command(create_event_table: bool, **options: Any) -> None:
    """Create or upgrade the outbox schema (idempotent; safe to run from every replica)."""
    settings = settings_from(options)

    async def go() -> None:
        async with await connect_postgres(settings) as conn:
            applied = await migrate(conn, settings.names, create_event_table=create_event_table)
            target = connected_to(conn)
        if applied:
            for migration in applied:
                click.echo(f"applied {migration.version:04d}_{migration.name}")
        click.echo(
            f"schema {settings.schema} is at version {latest_version()} in database {target}"
        )

    run_async(go)


@click.command("roles")
@with_options(DATABASE_OPTIONS)
def roles_command(**options: Any) -> None:
    """Create least-privilege group roles for producers, relays and operators (sql/roles.sql)."""
    settings = settings_from(options)

    async def go() -> None:
        async with await connect_postgres(settings) as conn:
            roles = await grant_roles(conn, settings.names)
        for purpose, role in zip(ROLE_PURPOSES, roles, strict=True):
            click.echo(f"{purpose:9} {role}")
        click.echo("grant them to login roles: GRANT <role> TO <login>;")

    run_async(go)
