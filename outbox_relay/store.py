"""The relay's side of the outbox table: claim, delete, record failures, measure lag.

All I/O goes through one :class:`psycopg.AsyncConnection` handed in by the caller,
which owns the transaction: a claim's row locks last until it commits or rolls back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, LiteralString, Protocol

import anyio
import psycopg
from psycopg import sql

from outbox_relay.config import DEFAULT_BATCH_MAX_BYTES
from outbox_relay.errors import NotMigratedError
from outbox_relay.queries import CLAIM_SHIFT, Names, compiled, query
from outbox_relay.schema import latest_version

# How often a relay that publishes only what a standby has looks again: a standby
# reports each flush at once, so this is about a loopback round trip.
_STANDBY_POLL = 0.002


# Not frozen: a frozen dataclass's __init__ costs five times as much, once per row.
@dataclass(slots=True)
class OutboxMessage:
    id: int
    event_id: str
    subject: str
    payload: bytes
    headers: dict[str, str] | None
    ordering_key: str | None = None
    # Increases along each key's messages in the order they are published: the
    # claim's number, then the row's place in it (Outbox-Sequence).
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    """A publish that failed because of the row itself (too large, refused, unroutable)."""

    id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Lag:
    pending: int
    oldest_age_seconds: float
    dead_letters: int
    held: int = 0  # pending rows waiting behind a dead letter of their key

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TableHealth:
    """The outbox table's live and dead rows and size, as PostgreSQL's statistics see them."""

    live_rows: int
    dead_rows: int
    size_bytes: int
    since_vacuum_seconds: float | None  # None: never vacuumed

    # Past this many dead rows, with more dead than live ones, claims slow down.
    DEAD_ROWS_WARNING = 1_000_000

    def bloat_warning(self) -> str | None:
        if self.dead_rows < self.DEAD_ROWS_WARNING or self.dead_rows < self.live_rows:
            return None
        vacuumed = (
            f"last vacuumed {self.since_vacuum_seconds / 60:.0f} min ago"
            if self.since_vacuum_seconds is not None
            else "never vacuumed"
        )
        return (
            f"the outbox table is bloated: {self.dead_rows:,} dead rows, {self.live_rows:,} "
            f"live, {self.size_bytes / 2**20:,.0f} MiB, {vacuumed}. Look for a long "
            "transaction holding vacuum back (pg_stat_activity.backend_xmin) and check the "
            "table's autovacuum settings (README: Retention)"
        )


@dataclass(frozen=True, slots=True)
class FailureOutcome:
    retried: int
    dead_lettered: int


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    backoff: float = 1.0
    backoff_max: float = 300.0


@dataclass(frozen=True, slots=True)
class Squatter:
    """A session holding key partitions without being a relay."""

    pid: int
    user: str
    application: str
    client: str
    partitions: int

    def describe(self) -> str:
        return (
            f"pid {self.pid} (user {self.user or '?'}, application {self.application or '?'}, "
            f"from {self.client}) holds {self.partitions} key partitions without being a relay"
        )


@dataclass(frozen=True, slots=True)
class ClaimScope:
    """Which rows a claim may take: every row, or keyless rows and owned partitions'."""

    ordered: bool = False
    partitions: frozenset[int] = frozenset()
    hold_behind_dead_letters: bool = True
    # The backend holding the partitions' locks, when the claim runs on another
    # session: only partitions it still holds are claimed.
    owner_pid: int | None = None

    def params(self) -> dict[str, Any]:
        return {
            "ordered": self.ordered,
            "partitions": sorted(self.partitions),
            "hold": self.hold_behind_dead_letters,
            "owner_pid": self.owner_pid,
        }


UNORDERED = ClaimScope()


def _is_relay(pid: LiteralString, names: Names) -> sql.Composed:
    """The shared condition: the session of ``pid`` (a column) is a relay."""
    return query("relay_session", names, pid=sql.SQL(pid))


class OutboxLayout(Protocol):
    """What the relay does with an outbox table's rows, whatever the table's layout:
    the seam a layout plugs into. :class:`OutboxStore` is ours (sql/migrations/);
    everything else the relay does (partitions, the idle lock) is layout-free."""

    async def claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        limit: int,
        scope: ClaimScope = ...,
        *,
        max_bytes: int = ...,
    ) -> list[OutboxMessage]: ...

    async def finish(
        self,
        conn: psycopg.AsyncConnection[Any],
        published: Sequence[int],
        failures: Sequence[Failure],
    ) -> FailureOutcome: ...

    async def lag(self, conn: psycopg.AsyncConnection[Any]) -> Lag: ...

    async def table_health(self, conn: psycopg.AsyncConnection[Any]) -> TableHealth: ...


class OutboxStore:
    def __init__(self, names: Names, retry: RetryPolicy) -> None:
        def named(name: str, **extra: sql.Composable) -> bytes:
            return compiled(query(name, names, **extra))

        # The version this release speaks: the claim fence refuses any other.
        self._schema_version = latest_version()
        self._claim = named("claim_batch")
        self._delete = named("delete_published")
        self._record_failures = named("record_failures")
        self._lag = named("lag")
        self._table_health = named("table_health")
        self._take_idle_lock = named("take_idle_lock")
        self._idle_lock_held_elsewhere = named("idle_lock_held_elsewhere")
        self._release_idle_lock = named("release_idle_lock")
        self._join_relays = named("join_relays")
        self._ping = named("ping")
        self._wal_position = named("wal_position")
        self._standby_has = named("standby_has")
        self._count_relays = named("count_relays", is_relay=_is_relay("r.pid", names))
        self._take_partitions = named("take_partitions")
        self._release_partitions = named("release_partitions")
        self._contested_partitions = named("contested_partitions")
        self._leave_relays = named("leave_relays")
        self._partition_squatters = named("partition_squatters", is_relay=_is_relay("p.pid", names))
        self._announce_partitions = named("announce_partitions")
        self._wait_for_producers = named("wait_for_producers")
        self._retry = retry

    async def claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        limit: int,
        scope: ClaimScope = UNORDERED,
        *,
        max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
    ) -> list[OutboxMessage]:
        """Lock up to ``limit`` due rows, oldest first, skipping rows other relays hold;
        return those that start within ``max_bytes`` of payload (at least one)."""
        params = {
            "limit": limit,
            "max_bytes": max_bytes,
            "schema_version": self._schema_version,
            **scope.params(),
        }
        # Binary results: bytea arrives as the stored bytes, with no hex decoding.
        async with conn.cursor(binary=True) as cur:
            try:
                await cur.execute(self._claim, params)
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                # The claim fence: the schema moved on (sql/migrations/0005).
                raise NotMigratedError(
                    f"{exc.diag.message_primary}: {exc.diag.message_hint}"
                ) from None
            rows = await cur.fetchall()
        return [
            OutboxMessage(
                row_id, msg_id, subject, payload, headers, key, (claim << CLAIM_SHIFT) + n
            )
            for n, (row_id, msg_id, subject, payload, headers, key, claim) in enumerate(rows)
        ]

    async def finish(
        self,
        conn: psycopg.AsyncConnection[Any],
        published: Sequence[int],
        failures: Sequence[Failure],
    ) -> FailureOutcome:
        """Delete the rows published; retry or dead-letter the failed ones (the
        caller's transaction, the claim's)."""
        if published:
            await conn.execute(self._delete, {"ids": list(published)})
        return await self._record_failures_of(conn, failures)

    async def _record_failures_of(
        self, conn: psycopg.AsyncConnection[Any], failures: Sequence[Failure]
    ) -> FailureOutcome:
        if not failures:
            return FailureOutcome(0, 0)
        cur = await conn.execute(
            self._record_failures,
            {
                "ids": [f.id for f in failures],
                "errors": [f.reason for f in failures],
                "max_attempts": self._retry.max_attempts,
                "backoff": self._retry.backoff,
                "backoff_max": self._retry.backoff_max,
            },
        )
        row = await cur.fetchone()
        assert row is not None
        return FailureOutcome(retried=int(row[0]), dead_lettered=int(row[1]))

    async def lag(self, conn: psycopg.AsyncConnection[Any]) -> Lag:
        cur = await conn.execute(self._lag)
        row = await cur.fetchone()
        assert row is not None
        return Lag(
            pending=int(row[0]),
            oldest_age_seconds=float(row[1]),
            dead_letters=int(row[2]),
            held=int(row[3]),
        )

    async def table_health(self, conn: psycopg.AsyncConnection[Any]) -> TableHealth:
        cur = await conn.execute(self._table_health)
        row = await cur.fetchone()
        assert row is not None
        live, dead, size, since = row
        return TableHealth(int(live), int(dead), int(size), None if since is None else float(since))

    # The idle lock (sql/migrations/0002_idle_wakeup.sql) is session-level: these run
    # in short transactions of their own and the lock outlives them.

    async def take_idle_lock(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Try to hold the idle lock; False while another relay or a producer holds it."""
        return await self._flag(conn, self._take_idle_lock)

    async def idle_lock_held_elsewhere(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether another relay sleeps holding the idle lock (so producers notify)."""
        return await self._flag(conn, self._idle_lock_held_elsewhere)

    async def release_idle_lock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._flag(conn, self._release_idle_lock)

    @staticmethod
    async def _flag(conn: psycopg.AsyncConnection[Any], statement: bytes) -> bool:
        async with conn.transaction():
            cur = await conn.execute(statement)
            row = await cur.fetchone()
        return bool(row and row[0])

    async def ping(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._flag(conn, self._ping)

    async def standby_has_claim(self, conn: psycopg.AsyncConnection[Any], until: float) -> bool:
        """Wait until a standby has flushed the commits of the rows just claimed (in
        the claim's transaction); False if none has by ``until`` (monotonic)."""
        cur = await conn.execute(self._wal_position)
        row = await cur.fetchone()
        lsn = row[0] if row else None
        while True:
            cur = await conn.execute(self._standby_has, {"lsn": lsn})
            row = await cur.fetchone()
            if row and row[0]:
                return True
            if time.monotonic() >= until:
                return False
            await anyio.sleep(_STANDBY_POLL)

    # Key partitions (sql/migrations/0004_ordered_delivery.sql): session-level locks,
    # taken and released between batches, in short transactions of their own.

    async def join_relays(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await conn.execute(self._join_relays)

    async def count_relays(self, conn: psycopg.AsyncConnection[Any]) -> int:
        async with conn.transaction():
            cur = await conn.execute(self._count_relays)
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def take_partitions(
        self, conn: psycopg.AsyncConnection[Any], candidates: Sequence[int], wanted: int
    ) -> list[int]:
        """Lock up to ``wanted`` of the free ``candidates``, in order; return those taken."""
        async with conn.transaction():
            cur = await conn.execute(
                self._take_partitions, {"candidates": list(candidates), "wanted": wanted}
            )
            return [int(row[0]) for row in await cur.fetchall()]

    async def contested_partitions(
        self, conn: psycopg.AsyncConnection[Any], partitions: Sequence[int]
    ) -> frozenset[int]:
        """Of ``partitions`` (held by this session), those whose rows another session
        still holds claimed: an old owner's, still publishing or not yet timed out."""
        if not partitions:
            return frozenset()
        async with conn.transaction():
            cur = await conn.execute(self._contested_partitions, {"partitions": list(partitions)})
            return frozenset(int(row[0]) for row in await cur.fetchall())

    async def release_partitions(
        self, conn: psycopg.AsyncConnection[Any], partitions: Sequence[int]
    ) -> None:
        if partitions:
            async with conn.transaction():
                await conn.execute(self._release_partitions, {"partitions": list(partitions)})

    async def leave_relays(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Stop counting among the relays (the partitions must be given back first)."""
        async with conn.transaction():
            await conn.execute(self._leave_relays)

    async def announce_partitions(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Wake the other relays: partitions were given back."""
        await self._flag(conn, self._announce_partitions)

    async def partition_squatters(self, conn: psycopg.AsyncConnection[Any]) -> list[Squatter]:
        cur = await conn.execute(self._partition_squatters)
        return [Squatter(*row) for row in await cur.fetchall()]

    async def wait_for_producers(self, conn: psycopg.AsyncConnection[Any], at_most: float) -> bool:
        """Block until no producer is between its outbox insert and its commit.

        False when producers were still in flight after ``at_most`` seconds.
        """
        try:
            async with conn.transaction():
                await conn.execute(
                    self._wait_for_producers, {"lock_timeout": f"{int(at_most * 1000)}ms"}
                )
        except psycopg.errors.LockNotAvailable:
            return False
        return True
