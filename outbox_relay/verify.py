"""Check the stream against the database: was every committed event stored once?

Each event of a window, known by its (execution id, event id), is classified as

* ``ok``: committed, in the stream once;
* ``pending``: committed, not in the stream yet, still in the outbox or dead letters;
* ``lost``: committed, gone from the outbox, not in the stream;
* ``duplicate``: stored in the stream more than once;
* ``unexpected``: in the stream, never committed;
* ``collided``: one event id committed by two rows (two executions): they share a
  msg id, so JetStream keeps one of them;
* ``rolled_back_by_failover``: in the stream, published by a relay (it carries the
  relay's ``Nats-Expected-Stream``), but the event is not in the database, which has
  changed timeline (promoted, or restored to a point in time). A relay publishes only
  rows it read committed, so the database lost a commit: a failover to an
  asynchronous standby that had not received it. On a server still on its first
  timeline no commit can have been lost that way, and any publisher can set the
  relay's headers: such messages, like other messages of unknown events, are
  ``unexpected``;

and every ordering key's messages are checked to stand in the stream in the order
the relay published them (``out_of_order`` counts those that do not: a relay that
kept publishing after it lost its key's partition, say). An event message whose
key (``--ordering-key``, the producers' key column, read from the payload) is
missing from its ordering headers is ``unkeyed``: a relay or a replay that dropped
the order.

The stream keeps messages for its max age only: verify windows inside it.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Any, TypeVar

import orjson
import psycopg
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from outbox_relay.config import Settings
from outbox_relay.errors import OutboxError
from outbox_relay.ids import EPOCH_MS, LOW_BITS
from outbox_relay.jetstream import read_stream_batches
from outbox_relay.publish import (
    EXPECTED_STREAM_HEADER,
    MSG_ID_HEADER,
    ORDERING_KEY_HEADER,
    SEQUENCE_HEADER,
)
from outbox_relay.queries import Names, query

_BIGINT_MAX = 2**63 - 1
SAMPLE = 20  # problem ids listed per class; counts are always complete
# The classes that make a report unclean.
PROBLEMS = (
    "lost",
    "duplicate",
    "unexpected",
    "out_of_order",
    "unkeyed",
    "collided",
    "rolled_back_by_failover",
)
K = TypeVar("K", bound=Hashable)
# (execution id, event id); None when a message's payload names no execution.
EventKey = tuple[int | None, int]


class VerificationFailed(OutboxError):
    """Something committed is lost or doubled, or the stream holds what never committed."""

    exit_code = 5


@dataclass(frozen=True, slots=True)
class Window:
    """Event ids from ``from_id`` to ``to_id``, both inclusive; None is open."""

    from_id: int | None = None
    to_id: int | None = None

    @classmethod
    def between(cls, since: datetime | None, until: datetime | None) -> Window:
        """The ids a snowflake generator mints in a time span (time sits in the top bits)."""

        def first_id(moment: datetime) -> int:
            return max(0, int(moment.timestamp() * 1000) - EPOCH_MS) << LOW_BITS

        def bigint(event_id: int) -> int:  # past 2058 the ids would not fit
            return min(event_id, _BIGINT_MAX)

        return cls(
            bigint(first_id(since)) if since else None,
            bigint(first_id(until) + (1 << LOW_BITS) - 1) if until else None,
        )

    def __contains__(self, event_id: int) -> bool:
        return (self.from_id is None or event_id >= self.from_id) and (
            self.to_id is None or event_id <= self.to_id
        )

    def params(self) -> dict[str, int | None]:
        return {"from_id": self.from_id, "to_id": self.to_id}


@dataclass(slots=True)
class Report:
    ok: int = 0
    pending: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    duplicate: dict[int, int] = field(default_factory=dict)  # event id -> copies
    unexpected: list[int] = field(default_factory=list)
    out_of_order: list[int] = field(default_factory=list)  # stored before an earlier one
    unkeyed: list[int] = field(default_factory=list)  # event messages without their key
    collided: list[int] = field(default_factory=list)  # committed by more than one row
    # Relay-published, gone from a database that has changed timeline: a commit the
    # failover (or a point-in-time restore) did not keep.
    rolled_back_by_failover: list[int] = field(default_factory=list)
    timeline: int | None = None  # the server's; None: not readable by this role

    @property
    def clean(self) -> bool:
        return not any(getattr(self, problem) for problem in PROBLEMS)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "pending": len(self.pending),
            **{problem: len(getattr(self, problem)) for problem in PROBLEMS},
            "clean": self.clean,
            "timeline": self.timeline,
            "samples": {
                "pending": sorted(self.pending)[:SAMPLE],
                "lost": sorted(self.lost)[:SAMPLE],
                "duplicate": {str(k): v for k, v in sorted(self.duplicate.items())[:SAMPLE]},
                "unexpected": sorted(self.unexpected)[:SAMPLE],
                "out_of_order": self.out_of_order[:SAMPLE],
                "unkeyed": sorted(self.unkeyed)[:SAMPLE],
                "collided": sorted(self.collided)[:SAMPLE],
                "rolled_back_by_failover": sorted(self.rolled_back_by_failover)[:SAMPLE],
            },
        }


def _itself(key: Any) -> int:
    return int(key)


def classify_ids(
    committed: AbstractSet[K],
    waiting: AbstractSet[K],
    stored: Counter[K],
    event_id: Callable[[K], int] = _itself,
) -> Report:
    """The pure part: sort keys (event ids, or anything ``event_id`` reads one from) by
    what the database and the stream say of them; the report lists event ids."""
    report = Report()
    for key in committed:
        copies = stored.get(key, 0)
        if copies == 1:
            report.ok += 1
        elif copies > 1:
            report.duplicate[event_id(key)] = copies
        elif key in waiting:
            report.pending.append(event_id(key))
        else:
            report.lost.append(event_id(key))
    report.unexpected = [event_id(k) for k in stored if k not in committed]
    for key, copies in stored.items():
        if copies > 1 and key not in committed:
            report.duplicate[event_id(key)] = copies
    return report


def collided(committed: Iterable[EventKey]) -> list[int]:
    """Event ids committed by more than one row: one msg id for several events."""
    rows = Counter(event_id for _, event_id in committed)
    return [event_id for event_id, count in rows.items() if count > 1]


def _attributed(stored: Counter[EventKey], committed: set[EventKey]) -> Counter[EventKey]:
    """A message whose payload names no execution counts for its event id's one row."""
    rows: dict[int, list[EventKey]] = {}
    for key in committed:
        rows.setdefault(key[1], []).append(key)
    attributed: Counter[EventKey] = Counter()
    for (execution_id, event_id), copies in stored.items():
        owners = rows.get(event_id, [])
        sole = execution_id is None and len(owners) == 1
        attributed[owners[0] if sole else (execution_id, event_id)] += copies
    return attributed


def event_row(payload: bytes) -> dict[str, Any] | None:
    """An event message's payload as the event row it is (None: not a JSON object)."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _execution_id(event: dict[str, Any] | None) -> int | None:
    """The execution an event row names."""
    execution_id = event.get("execution_id") if event is not None else None
    return execution_id if isinstance(execution_id, int) else None


class OrderCheck:
    """Messages seen in stream order, one at a time; :attr:`found` lists the event ids
    stored after a later row of their key (see :func:`out_of_order`)."""

    __slots__ = ("_by_event_id", "_found", "_last_id", "_last_sequence")

    def __init__(self, *, by_event_id: bool = False) -> None:
        self._by_event_id = by_event_id
        self._last_sequence: dict[str, int] = {}
        self._last_id: dict[str, int] = {}
        self._found: dict[int, None] = {}  # ordered, once each

    def see(self, event_id: int, key: str, sequence: int) -> None:
        last_sequence = self._last_sequence.get(key, sequence)
        last_id = self._last_id.get(key, event_id)
        if sequence < last_sequence or (self._by_event_id and event_id < last_id):
            self._found[event_id] = None
        self._last_sequence[key] = max(sequence, last_sequence)
        self._last_id[key] = max(event_id, last_id)

    @property
    def found(self) -> list[int]:
        return list(self._found)


def out_of_order(stored: Iterable[tuple[int, str, int]], *, by_event_id: bool = False) -> list[int]:
    """Event ids stored after a later row of their key: (event id, key, sequence) in
    stream order. By the relay's sequence numbers, a repeat copy included: a stale copy
    landing after later events is out of order too (it is also a duplicate). With
    ``by_event_id``, by the database's event ids as well, for keys whose events were
    written one transaction at a time, so that id order is their causal order: a
    relay that publishes a key's rows out of order gives them increasing sequences,
    which only the ids can contradict."""
    check = OrderCheck(by_event_id=by_event_id)
    for event_id, key, sequence in stored:
        check.see(event_id, key, sequence)
    return check.found


# Rows a chunk when reading the database's side; libpq before 17 streams one at a time.
_STREAM_ROWS = 10_000 if psycopg.pq.version() >= 170000 else 1
# An event row without an execution id, among the 32-bit stand-ins of _execution_hash.
_NO_EXECUTION = -(2**31)
_HASH_PRIME = 4_294_967_291  # the largest prime below 2**32


def _execution_hash(execution_id: int | None) -> int:
    """A signed 32-bit stand-in for an execution id, so verify keeps 4 bytes an event
    instead of 8. Two executions share one only if they differ by a multiple of a
    2**32-sized prime; only a message naming the wrong one of two such executions for
    an event id could then pass unseen."""
    if execution_id is None:
        return _NO_EXECUTION
    return execution_id % _HASH_PRIME - (2**31 - 1)


class _Committed:
    """The window's committed events in event id order, in arrays: 8 bytes for the
    event id, 4 for its execution, 1 for the copies the stream holds of it. A set of
    (execution id, event id) tuples took about 160 bytes an event."""

    def __init__(self) -> None:
        self.ids = array("q")
        self.executions = array("i")
        self.copies = bytearray()

    @classmethod
    async def read(
        cls, conn: psycopg.AsyncConnection[Any], names: Names, params: dict[str, Any]
    ) -> _Committed:
        committed = cls()
        async with conn.cursor() as cur:
            async for execution_id, event_id in cur.stream(
                query("verify_committed", names), params, size=_STREAM_ROWS
            ):
                committed.ids.append(event_id)
                committed.executions.append(_execution_hash(execution_id))
        committed.copies = bytearray(len(committed.ids))
        return committed

    def count(self, execution_id: int | None, event_id: int) -> bool:
        """Count a stored copy of the event; False when no committed row is it (a
        message naming no execution counts for its event id's only row)."""
        row = self._row(execution_id, event_id)
        if row is None:
            return False
        if self.copies[row] < 255:  # 255 stands for "255 or more"
            self.copies[row] += 1
        return True

    def holds(self, key: EventKey) -> bool:
        """Whether the row (execution id, event id) is among these."""
        execution_id, event_id = key
        row = self._row(execution_id, event_id)
        return row is not None and self.executions[row] == _execution_hash(execution_id)

    def _row(self, execution_id: int | None, event_id: int) -> int | None:
        ids = self.ids
        first = bisect_left(ids, event_id)
        end = first
        while end < len(ids) and ids[end] == event_id:
            end += 1
        if execution_id is None:
            return first if end - first == 1 else None
        wanted = _execution_hash(execution_id)
        return next((n for n in range(first, end) if self.executions[n] == wanted), None)

    def classify(self, waiting: array[int]) -> Report:
        """Each committed event by the copies counted: ok, duplicate, or, with none,
        pending while the outbox or the dead letters still hold its id, else lost."""
        report = Report(ok=self.copies.count(1))
        row = self.copies.find(0)
        while row != -1:
            event_id = self.ids[row]
            (report.pending if _holds(waiting, event_id) else report.lost).append(event_id)
            row = self.copies.find(0, row + 1)
        if report.ok + len(report.pending) + len(report.lost) < len(self.ids):
            for row, copies in enumerate(self.copies):
                if copies > 1:
                    report.duplicate[self.ids[row]] = copies
        ids = self.ids
        report.collided = sorted({ids[n] for n in range(1, len(ids)) if ids[n] == ids[n - 1]})
        return report


def _holds(ids: array[int], event_id: int) -> bool:
    """Whether the sorted array ``ids`` holds ``event_id``."""
    at = bisect_left(ids, event_id)
    return at < len(ids) and ids[at] == event_id


async def verify(
    conn: psycopg.AsyncConnection[Any],
    js: JetStreamContext,
    settings: Settings,
    window: Window,
    *,
    strict_order: bool = False,
) -> Report:
    """Read the window's event ids from the database and the stream, and classify them.

    ``strict_order``: each key's events were written one transaction at a time, so
    their event ids are their causal order, and the stream is checked against it
    (:func:`out_of_order`). Keys written by concurrent transactions follow commit
    order, which event ids do not record: leave it off for them.

    The database is read first, so whatever the stream holds had a chance to commit
    before; ids committed in between are looked up again rather than called
    unexpected. A relay may keep running meanwhile.
    """
    names, params = settings.names, window.params()
    committed = await _Committed.read(conn, names, params)
    waiting = array("q")
    async with conn.cursor() as cur:
        async for (event_id,) in cur.stream(
            query("verify_pending", names), params, size=_STREAM_ROWS
        ):
            waiting.append(event_id)
    timeline = await _timeline(conn, names)
    seen = _Stored(
        window,
        settings.stream,
        # Relays in unordered mode send no ordering headers.
        settings.ordering_key if settings.ordered else None,
        committed,
        OrderCheck(by_event_id=strict_order),
        # On a server that has changed timeline, a message of an event not committed
        # may have been rolled back, and the new primary draws its claim numbers
        # again: such messages are left out of the order check.
        order_uncommitted=(timeline or 0) <= 1,
    )
    # A batch at a time, keeping a few bytes of each message: memory follows the
    # window's events, not the stream's bytes.
    async for batch in read_stream_batches(js, settings.stream, subject=settings.subject_wildcard):
        for message in batch:
            seen.take(message)
    report = committed.classify(waiting)
    # Messages of events not committed when the database was read: committed since
    # (a relay may run meanwhile), or never.
    late: set[EventKey] = set()
    if seen.uncommitted:
        ids = sorted({key[1] for key in seen.uncommitted})
        cur = await conn.execute(query("verify_exists", names), {"ids": ids})
        # Rows read up front are classified already: a message naming another
        # execution for one of their ids must not classify them again.
        late = {(row[0], row[1]) for row in await cur.fetchall()}
        late = {key for key in late if not committed.holds(key)}
    # The outbox knows a row by its msg id alone: every row of a waiting id waits.
    late_waiting = {key for key in late if _holds(waiting, key[1])}
    rest = classify_ids(
        late, late_waiting, _attributed(seen.uncommitted, late), event_id=itemgetter(1)
    )
    report.ok += rest.ok
    report.pending += rest.pending
    report.lost += rest.lost
    report.duplicate |= rest.duplicate
    report.collided = sorted(set(report.collided) | set(collided(late)))
    report.timeline = timeline
    # Any publisher can set the relay's headers: only a server that has changed
    # timeline (promoted, or restored to a point in time) can have lost commits.
    gone = set(rest.unexpected) & seen.relayed if (timeline or 0) > 1 else set()
    report.rolled_back_by_failover = sorted(gone)
    report.unexpected = [event_id for event_id in rest.unexpected if event_id not in gone]
    report.out_of_order = [e for e in seen.order.found if e not in gone]
    report.unkeyed = seen.unkeyed
    return report


@dataclass(slots=True)
class _Stored:
    """What verify keeps of each stream message: a count, or for the few messages of
    events not committed when the database was read, their ids; the order check's
    state per key; the unkeyed. Never the payload."""

    window: Window
    stream: str
    ordering_key: str | None  # the producers' key column, None in unordered mode
    committed: _Committed
    order: OrderCheck
    order_uncommitted: bool
    uncommitted: Counter[EventKey] = field(default_factory=Counter)
    relayed: set[int] = field(default_factory=set)  # of those, the ones a relay sent
    unkeyed: list[int] = field(default_factory=list)

    def take(self, message: Msg) -> None:
        headers = message.header or {}
        msg_id = headers.get(MSG_ID_HEADER, "")
        if not (msg_id.lstrip("-").isdigit() and int(msg_id) in self.window):
            return
        event_id = int(msg_id)
        event = event_row(message.data)
        execution_id = _execution_id(event)
        counted = self.committed.count(execution_id, event_id)
        if not counted:
            self.uncommitted[(execution_id, event_id)] += 1
            if headers.get(EXPECTED_STREAM_HEADER) == self.stream:
                self.relayed.add(event_id)
        key, sequence = headers.get(ORDERING_KEY_HEADER), headers.get(SEQUENCE_HEADER, "")
        if key is not None and sequence.isdigit() and (counted or self.order_uncommitted):
            self.order.see(event_id, key, int(sequence))
        expected = event_key(event, self.ordering_key)
        if expected is not None and (key != expected or not sequence.isdigit()):
            self.unkeyed.append(event_id)


async def _timeline(conn: psycopg.AsyncConnection[Any], names: Names) -> int | None:
    """The server's timeline, None if this role may not read it."""
    try:
        # A savepoint inside a caller's transaction: a refusal must not abort it.
        async with conn.transaction():
            cur = await conn.execute(query("timeline", names))
            row = await cur.fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    return int(row[0]) if row is not None else None


def event_key(event: dict[str, Any] | None, column: str | None) -> str | None:
    """The ordering key an event message should carry: its key column, as SQL's
    ``::text`` renders it (None: unkeyed, or not an event row)."""
    value = event.get(column) if event is not None and column is not None else None
    if value is None or isinstance(value, bool | dict | list):
        return None
    return str(value)
