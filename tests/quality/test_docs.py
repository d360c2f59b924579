"""The README stays true to the code: every option documented, setup commands as run."""

import re
from pathlib import Path

import click

from outbox_relay.cli import cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _options() -> list[click.Option]:
    params = list(cli.params)
    for command in cli.commands.values():
        params.extend(command.params)
    return [p for p in params if isinstance(p, click.Option) and p.envvar]


def test_every_option_is_in_the_configuration_table() -> None:
    rows = {
        (m[1], m[2], m[3])
        for m in re.finditer(r"^\| `(--[\w-]+)` \| `(\w+)` \| (.+?) \|", README, re.MULTILINE)
    }
    documented = {(flag, env) for flag, env, _ in rows}
    for option in _options():
        assert (option.opts[0], option.envvar) in documented, option.opts[0]
        default = str(option.default)
        if default:
            ((_, _, shown),) = [r for r in rows if r[0] == option.opts[0]]
            assert default in shown, (option.opts[0], default, shown)


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(python3 -m venv .+?)\n```", README)
    demo, tests = blocks
    assert demo.endswith("outbox-relay demo")
    assert tests.endswith(".venv/bin/pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
