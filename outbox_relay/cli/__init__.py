"""The ``outbox-relay`` command line.

Every option has an environment variable; user mistakes end in one line on stderr
and a non-zero exit code (2 usage/config, 3 server unreachable, 4 not migrated).

The commands live by group: :mod:`.relay_commands`, :mod:`.schema_commands`,
:mod:`.inspection`, :mod:`.operations`; shared option tables in :mod:`.options`.
"""

from __future__ import annotations

import sys

import click
import psycopg

from outbox_relay.cli.inspection import check_command, lag_command, verify_command
from outbox_relay.cli.operations import dead_letters_group, replay_command
from outbox_relay.cli.options import settings_from
from outbox_relay.cli.relay_commands import demo_command, run_command
from outbox_relay.cli.schema_commands import migrate_command, roles_command
from outbox_relay.errors import OutboxError
from outbox_relay.logs import LogFormat, configure_logging

__all__ = ["cli", "configuration_reference", "main", "settings_from"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    show_default=True,
    help="Least severe level logged.",
)
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    default="auto",
    type=click.Choice(["auto", "json", "text"]),
    show_default=True,
    help="auto: JSON lines unless stderr is a terminal.",
)
@click.version_option(package_name="outbox-relay")
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: LogFormat) -> None:
    """Relay committed PostgreSQL outbox rows to NATS JetStream, exactly once in effect."""
    ctx.obj = {"log_level": log_level, "log_format": log_format}
    configure_logging(log_level, log_format)


def _relog(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """The log options given after the command, as users type them: they win."""
    if value is None or param.name is None:
        return
    chosen = ctx.find_root().obj
    chosen[param.name] = value
    configure_logging(chosen["log_level"], chosen["log_format"])


def _log_options_everywhere(command: click.Command) -> None:
    """``outbox-relay run --log-format text`` as well as before the command; the
    environment variables stay the group's, so the reference lists them once."""
    for param in cli.params:
        if isinstance(param, click.Option) and param.name in ("log_level", "log_format"):
            command.params.append(
                click.Option(
                    param.opts,
                    type=param.type,
                    expose_value=False,
                    callback=_relog,
                    help=f"{param.help} Also before the command.",
                )
            )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _log_options_everywhere(sub)


# In this order: config-reference lists each flag's commands in it.
for _command in (
    migrate_command,
    roles_command,
    run_command,
    lag_command,
    check_command,
    verify_command,
    replay_command,
    dead_letters_group,
    demo_command,
):
    _log_options_everywhere(_command)
    cli.add_command(_command)


@cli.command("config-reference")
def config_reference_command() -> None:
    """Print every option as a Markdown table (the README's copy is checked against it)."""
    click.echo(configuration_reference(), nl=False)


def configuration_reference() -> str:
    """Flags, environment variables, defaults and meanings, from the options themselves."""
    seen: dict[str, tuple[click.Option, list[str]]] = {}
    commands: list[tuple[str, click.Command]] = [("(all)", cli)]
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):
            commands += [(f"{name} {sub}", c) for sub, c in command.commands.items()]
        else:
            commands.append((name, command))
    for name, command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                seen.setdefault(param.opts[0], (param, []))[1].append(name)
    lines = [
        "| flag | environment | default | commands | meaning |",
        "|---|---|---|---|---|",
    ]
    for flag, (option, users) in seen.items():
        default = option.default if option.show_default is not False else None
        shown = f"`{default}`" if default not in (None, "") else "—"
        meaning = (option.help or "").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{flag}` | `{option.envvar}` | {shown} | {', '.join(users)} | {meaning} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    try:
        try:
            cli.main(standalone_mode=False, prog_name="outbox-relay")
        except BaseExceptionGroup as group:
            # Task groups wrap a start-up error; report the single cause as such.
            raise _sole_cause(group) from group
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:
        # One line, like every other mistake; the usage is one --help away.
        command = exc.ctx.command_path if exc.ctx else "outbox-relay"
        click.echo(
            f"outbox-relay: error: {exc.format_message()} (see `{command} --help`)", err=True
        )
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OutboxError as exc:
        click.echo(f"outbox-relay: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        click.echo(f"outbox-relay: database error: {first_line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _sole_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group
