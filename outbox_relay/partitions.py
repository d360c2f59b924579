"""Key partitions a relay owns: one relay at a time publishes the rows of each key.

Ordering keys hash into :data:`~outbox_relay.queries.KEY_PARTITIONS` partitions. A
relay owns a partition while its session holds that partition's advisory lock, so
ownership ends with the session: a relay that dies, or freezes until PostgreSQL ends
its session, frees its partitions for the others. There is no coordinator: every
relay holds a shared "member" lock, counts the holders, and takes or gives back
partitions until it holds its fair share (the count rounded up, so together they
cover every partition). Partitions change hands only between batches.

The decisions (:func:`fair_share`, :func:`plan`) are pure; :class:`PartitionOwner`
does the I/O through the store.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox_relay.queries import KEY_PARTITIONS
from outbox_relay.store import OutboxStore


def fair_share(partitions: int, relays: int) -> int:
    """Partitions each of ``relays`` should own so that together they own all."""
    return -(-partitions // max(relays, 1))


def preference(relay_id: str, partitions: int = KEY_PARTITIONS) -> list[int]:
    """This relay's order of preference: a rotation, so relays start apart."""
    start = zlib.crc32(relay_id.encode()) % partitions
    return [(start + i) % partitions for i in range(partitions)]


@dataclass(frozen=True, slots=True)
class Plan:
    release: tuple[int, ...] = ()
    take: int = 0  # how many more to try to take


def plan(owned: frozenset[int], relays: int, order: Sequence[int]) -> Plan:
    """Give back what is over the fair share (least preferred first), or ask for more."""
    share = fair_share(len(order), relays)
    if len(owned) > share:
        surplus = [p for p in reversed(order) if p in owned][: len(owned) - share]
        return Plan(release=tuple(surplus))
    return Plan(take=share - len(owned))


class PartitionOwner:
    """The partitions this relay's session holds, rebalanced at most once an interval."""

    def __init__(self, store: OutboxStore, relay_id: str, interval: float = 0.25) -> None:
        self._store = store
        self._order = preference(relay_id)
        self._interval = interval
        self._next_check = 0.0
        self.owned: frozenset[int] = frozenset()
        # Owned, but an old owner's session still holds claimed rows of them: claiming
        # past those rows would put the key's later rows first.
        self.contested: frozenset[int] = frozenset()
        # Below its share, with none free: others still hold surplus to give back.
        self.short = False
        # Counted among the relays; False after leave() until the next join().
        self.joined = False
        # Partitions are to be given back once no batch is in flight.
        self.must_settle = False

    def forget(self) -> None:
        """The session is gone, and with it every lock it held."""
        self.owned = frozenset()
        self.contested = frozenset()
        self.short = False
        self.joined = False
        self.must_settle = False
        self._next_check = 0.0

    async def join(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Count this session among the relays (once per session)."""
        self.forget()
        await self._store.join_relays(conn)
        self.joined = True

    async def leave(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give every partition back, stop counting among the relays, wake the others."""
        await self._store.release_partitions(conn, sorted(self.owned))
        await self._store.leave_relays(conn)
        self.forget()
        await self._store.announce_partitions(conn)

    @property
    def claimable(self) -> frozenset[int]:
        """The partitions whose keyed rows this relay may claim now."""
        return self.owned - self.contested

    async def rebalance(self, conn: psycopg.AsyncConnection[Any], *, settled: bool) -> None:
        """Take or give back partitions towards the fair share. Giving back waits until
        the relay is ``settled`` (no batch in flight): the next owner must not publish
        a key's later rows before this relay's earlier ones; until then
        :attr:`must_settle` asks the relay to settle."""
        if self.contested:
            self.contested = await self._store.contested_partitions(conn, sorted(self.contested))
        now = time.monotonic()
        if not self.joined or now < self._next_check:
            return
        relays = await self._store.count_relays(conn)
        decided = plan(self.owned, relays, self._order)
        self.must_settle = bool(decided.release) and not settled
        if self.must_settle:
            return  # look again at the next claim, settled by then
        self._next_check = now + self._interval
        self.short = False
        if decided.release:
            await self._store.release_partitions(conn, decided.release)
            self.owned -= set(decided.release)
            # Probing a partition another relay owns now would get in its way.
            self.contested -= set(decided.release)
        elif decided.take:
            free = [p for p in self._order if p not in self.owned]
            taken = await self._store.take_partitions(conn, free, decided.take)
            self.owned |= set(taken)
            self.contested |= await self._store.contested_partitions(conn, taken)
            self.short = len(taken) < decided.take
