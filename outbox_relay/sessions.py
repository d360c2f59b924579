"""The relay's two PostgreSQL sessions, and its key partitions that the first holds.

The main session holds the session-level locks (membership, key partitions, the idle
lock); both sessions take turns claiming, so that PostgreSQL's work overlaps NATS's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import psycopg

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.errors import ServerUnavailableError
from outbox_relay.metrics import Connections
from outbox_relay.outages import STATEMENT_TIMEOUT, connection_lost, one_line
from outbox_relay.partitions import PartitionOwner
from outbox_relay.queries import query
from outbox_relay.schema import require_writable
from outbox_relay.store import OutboxStore

_IDLE_SESSION_TIMEOUT_SINCE = 140000  # PostgreSQL 14


class Sessions:
    """Opens, checks and reopens the main and the spare session."""

    def __init__(
        self,
        settings: Settings,
        store: OutboxStore,
        partitions: PartitionOwner,
        connections: Connections,
        application_name: str,
    ) -> None:
        self.settings = settings
        self._store = store
        self.partitions = partitions
        self._connections = connections
        # Shown in pg_stat_activity, so an operator can tell which relay holds what.
        self.application_name = application_name
        self.main: psycopg.AsyncConnection[Any] | None = None
        self.spare: psycopg.AsyncConnection[Any] | None = None
        self.reopen_error = ""  # why the sessions could not be reopened, for the log

    def first(self) -> psycopg.AsyncConnection[Any]:
        """The main session (once :meth:`open_main` has succeeded)."""
        assert self.main is not None, "the main session is opened first"
        return self.main

    def other(self) -> psycopg.AsyncConnection[Any]:
        """The spare session, or :class:`ServerUnavailableError` if it is gone."""
        if self.spare is None or self.spare.closed:
            raise ServerUnavailableError(self.reopen_error or "connection closed")
        return self.spare

    def usable(self, conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncConnection[Any]:
        if conn.closed:
            raise ServerUnavailableError(self.reopen_error or "connection closed")
        return conn

    def lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` means a session is gone (reconnect), rather than a bug."""
        return any(
            conn is not None and connection_lost(exc, conn) for conn in (self.main, self.spare)
        )

    async def open_main(self) -> None:
        self.main = await self._open(main=True)

    async def open_spare(self) -> None:
        self.spare = await self._open(main=False)

    async def reopen(self) -> None:
        # On failure the old, closed connection stays: the next batch fails fast and
        # backs off again, and says why it could not reconnect.
        try:
            await self.open_main()
            await self.open_spare()
        except (ServerUnavailableError, psycopg.OperationalError) as exc:
            self.reopen_error = one_line(exc)
        else:
            self.reopen_error = ""

    async def close(self) -> None:
        for conn in (self.main, self.spare):
            if conn is not None:
                await conn.close()

    async def keep_alive(self) -> None:
        """A statement, so idle_session_timeout (meant for a frozen relay) spares us."""
        if self.main is None or self.main.closed:
            return
        with contextlib.suppress(psycopg.Error, TimeoutError), anyio.fail_after(STATEMENT_TIMEOUT):
            await self._store.ping(self.main)

    async def _open(self, *, main: bool) -> psycopg.AsyncConnection[Any]:
        """A session to claim on. The main one also holds the session-level locks (key
        partitions, the idle lock), so a frozen relay's is ended when idle too."""
        settings = self.settings
        conn = await connect_postgres(settings, application_name=self.application_name)
        try:
            await require_writable(conn, settings.names)
            await conn.execute(
                query("configure_session", settings.names),
                {
                    "idle_in_transaction": f"{int(settings.claim_hold_bound * 1000)}ms",
                    "statement_timeout": f"{int(STATEMENT_TIMEOUT * 1000)}ms",
                },
            )
            await conn.commit()
            if not main:
                return conn
            if conn.info.server_version >= _IDLE_SESSION_TIMEOUT_SINCE:
                idle_session = settings.poll_interval + settings.claim_hold_bound
                await conn.execute(
                    query("configure_idle_session", settings.names),
                    {"idle_session": f"{int(idle_session * 1000)}ms"},
                )
                await conn.commit()
            if settings.ordered:
                await self.partitions.join(conn)
        except BaseException:
            await conn.close()
            raise
        self._connections.postgres = True
        return conn
