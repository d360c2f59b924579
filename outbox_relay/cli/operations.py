"""Operations commands: replay, dead-letters."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import click
import orjson

from outbox_relay import config
from outbox_relay.cli.options import (
    DATABASE_OPTIONS,
    ORDERING_KEY_OPTIONS,
    WINDOW_OPTIONS,
    duration,
    option,
    run_async,
    settings_from,
    window_bounds,
    with_options,
)
from outbox_relay.database import connect_postgres
from outbox_relay.dead_letters import (
    DeadLetterFilter,
    list_dead_letters,
    purge_dead_letters,
    retry_dead_letters,
    show_dead_letter,
)
from outbox_relay.errors import ConfigError, InvalidSubjectError
from outbox_relay.replay import ReplaySelection, replay
from outbox_relay.schema import ensure_migrated
from outbox_relay.subjects import validate_subject


@click.command("replay")
@with_options([*DATABASE_OPTIONS, *ORDERING_KEY_OPTIONS, *WINDOW_OPTIONS])
@option(
    "--subject-prefix",
    envvar="OUTBOX_SUBJECT_PREFIX",
    default=config.DEFAULT_SUBJECT_PREFIX,
    help="Replayed subjects are <prefix>.<event_type>.",
)
@click.option("--execution-id", "execution_ids", type=int, multiple=True, help="Repeatable.")
@click.option("--all", "everything", is_flag=True, help="Every event in the table.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def replay_command(
    subject_prefix: str,
    execution_ids: tuple[int, ...],
    everything: bool,
    dry_run: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Re-enqueue committed events from the event table, with their original event ids.

    Inside the stream's duplicate window a replayed event is collapsed with its first
    copy; use it for a new consumer's backfill or a lost stream.
    """
    window, since, until = window_bounds(options)
    selection = ReplaySelection(window, execution_ids or None, everything, since, until)
    settings = settings_from(options)
    try:
        validate_subject(subject_prefix)
    except InvalidSubjectError as exc:
        raise ConfigError(f"--subject-prefix: {exc}") from None

    async def go() -> int:
        async with await connect_postgres(settings) as conn:
            await ensure_migrated(conn, settings.names)
            count = await replay(
                conn,
                settings.names,
                subject_prefix,
                selection,
                ordering_key=settings.ordering_key,
                dry_run=dry_run,
            )
            await conn.commit()
            return count

    count = run_async(go)
    verb = "would replay" if dry_run else "replayed"
    if as_json:
        click.echo(orjson.dumps({verb.replace(" ", "_"): count}).decode())
    else:
        click.echo(f"{verb} {count} events")


@click.group("dead-letters")
def dead_letters_group() -> None:
    """List, re-queue or purge rows that failed --max-attempts times."""


DEAD_LETTER_FILTERS = [
    click.option("--id", "ids", type=int, multiple=True, help="Dead letter id (repeatable)."),
    click.option("--from-id", type=int, help="Lowest dead letter id."),
    click.option("--to-id", type=int, help="Highest dead letter id."),
    click.option("--reason", help="Case-insensitive part of the reason."),
    click.option("--older-than", callback=duration, help="Dead-lettered longer ago than this."),
]


def _selection(options: dict[str, Any], everything: bool = False) -> DeadLetterFilter:
    """The dead-letter filter options, taken out of ``options``."""
    return DeadLetterFilter(
        ids=options.pop("ids") or None,
        from_id=options.pop("from_id"),
        to_id=options.pop("to_id"),
        reason=options.pop("reason"),
        older_than=options.pop("older_than"),
        everything=everything,
    )


@dead_letters_group.command("list")
@with_options([*DATABASE_OPTIONS, *DEAD_LETTER_FILTERS])
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dead_letters_list(limit: int, as_json: bool, **options: Any) -> None:
    """Show dead letters, oldest first."""
    selection = _selection(options)
    settings = settings_from(options)

    async def go() -> list[dict[str, Any]]:
        async with await connect_postgres(settings, autocommit=True) as conn:
            await ensure_migrated(conn, settings.names)
            return await list_dead_letters(conn, settings.names, selection, limit)

    for row in run_async(go):
        if as_json:
            click.echo(orjson.dumps(row).decode())
        else:
            click.echo(
                f"{row['id']:>10}  {row['event_id']}  {row['subject']}  "
                f"attempts={row['attempts']}  {row['dead_lettered_at']:%Y-%m-%d %H:%M:%S}  "
                f"{row['reason']}"
            )


@dead_letters_group.command("show")
@with_options(DATABASE_OPTIONS)
@click.argument("dead_letter_id", type=int)
def dead_letters_show(dead_letter_id: int, **options: Any) -> None:
    """One dead letter whole, payload and headers included, as JSON."""
    settings = settings_from(options)

    async def go() -> dict[str, Any] | None:
        async with await connect_postgres(settings, autocommit=True) as conn:
            await ensure_migrated(conn, settings.names)
            return await show_dead_letter(conn, settings.names, dead_letter_id)

    row = run_async(go)
    if row is None:
        raise ConfigError(
            f"no dead letter {dead_letter_id}: `outbox-relay dead-letters list` shows them"
        )
    click.echo(orjson.dumps(row, option=orjson.OPT_INDENT_2).decode())


def _dead_letter_change(
    verb: str, change: Callable[..., Coroutine[Any, Any, int]]
) -> click.Command:
    @click.command(verb)
    @with_options([*DATABASE_OPTIONS, *DEAD_LETTER_FILTERS])
    @click.option("--all", "everything", is_flag=True, help="Every dead letter.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def command(everything: bool, as_json: bool, **options: Any) -> None:
        selection = _selection(options, everything)
        settings = settings_from(options)

        async def go() -> int:
            async with await connect_postgres(settings) as conn:
                await ensure_migrated(conn, settings.names)
                count = await change(conn, settings.names, selection)
                await conn.commit()
                return count

        count = run_async(go)
        if as_json:
            click.echo(orjson.dumps({verb: count}).decode())
        else:
            click.echo(f"{verb}: {count} dead letters")

    return command


dead_letters_group.add_command(_dead_letter_change("retry", retry_dead_letters))
dead_letters_group.add_command(_dead_letter_change("purge", purge_dead_letters))
dead_letters_group.commands["retry"].help = "Move dead letters back into the outbox."
dead_letters_group.commands["purge"].help = "Delete dead letters for good."
