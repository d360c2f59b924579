"""The project's own bar, checked with the suite: lint, types, Dockerfile, packaging."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    found = shutil.which(name, path=sysconfig.get_path("scripts"))
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def run(*command: str) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint() -> None:
    run(tool("ruff"), "check", ".")


def test_ruff_format() -> None:
    run(tool("ruff"), "format", "--check", ".")


@pytest.mark.slow
def test_mypy_strict() -> None:
    run(tool("mypy"))


def test_dockerfile_lint() -> None:
    run(tool("hadolint"), "Dockerfile")


@pytest.mark.slow
def test_wheel_carries_the_sql(tmp_path: Path) -> None:
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), ".")
    (wheel,) = tmp_path.glob("outbox_relay-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "outbox_relay/sql/queries.sql" in names
    assert "outbox_relay/sql/migrations/0001_initial.sql" in names
