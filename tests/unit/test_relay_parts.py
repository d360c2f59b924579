import time
from typing import TYPE_CHECKING, Any, cast

import anyio

from outbox_relay.config import Settings
from outbox_relay.jetstream import _Throttle
from outbox_relay.outages import Backoff
from outbox_relay.wakeup import Wakeup, Wakeups

if TYPE_CHECKING:
    import psycopg

    from outbox_relay.store import OutboxStore


def test_backoff_grows_to_its_cap_and_never_overflows() -> None:
    backoff = Backoff(initial=0.1, maximum=5.0)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(2.5 <= d <= 5.0 for d in delays[10:])
    backoff.reset()
    assert backoff.next_delay() <= 0.1


async def test_a_wakeup_set_before_the_wait_is_not_lost() -> None:
    wakeup = Wakeup()
    wakeup.clear()  # before the claim
    wakeup.set()  # a notification arrives during the claim
    started = time.monotonic()
    await wakeup.wait(30)  # returns at once: the claim runs again
    assert time.monotonic() - started < 1


async def test_a_cleared_wakeup_waits_for_the_next_set() -> None:
    wakeup = Wakeup()
    wakeup.set()
    wakeup.clear()
    with anyio.move_on_after(0.2) as scope:
        await wakeup.wait(30)
    assert scope.cancelled_caught


def test_bloat_is_reported_only_when_dead_rows_are_many_and_outnumber_live_ones() -> None:
    from outbox_relay.store import TableHealth

    many = TableHealth.DEAD_ROWS_WARNING
    assert TableHealth(0, many - 1, 1, 5.0).bloat_warning() is None
    assert TableHealth(many + 1, many, 1, 5.0).bloat_warning() is None
    warning = TableHealth(10, many, 300 * 2**20, None).bloat_warning()
    assert warning is not None
    assert "1,000,000 dead rows" in warning
    assert "never vacuumed" in warning
    assert "backend_xmin" in warning


class IdleLockLedger:
    """Stands in for the store's idle-lock statements, to test the wake-up's decisions:
    records each one, and counts how deep the (nesting) session lock is held."""

    def __init__(self, *, free: bool = True, held_elsewhere: bool = False) -> None:
        self.free = free
        self.held_elsewhere = held_elsewhere
        self.depth = 0
        self.statements: list[str] = []

    async def take_idle_lock(self, conn: object) -> bool:
        self.statements.append("take")
        if self.free:
            self.depth += 1
        return self.free

    async def idle_lock_held_elsewhere(self, conn: object) -> bool:
        self.statements.append("held elsewhere?")
        return self.held_elsewhere

    async def release_idle_lock(self, conn: object) -> None:
        self.statements.append("release")
        self.depth -= 1


def wakeups_over(ledger: IdleLockLedger, *, ordered: bool = False) -> Wakeups:
    settings = Settings(poll_interval=5.0, ordered=ordered)
    return Wakeups(settings, cast("OutboxStore", ledger), "test")


CONN = cast("psycopg.AsyncConnection[Any]", object())


async def sleep_then_wake(wakeups: Wakeups) -> None:
    """An empty outbox: take the lock, one more poll, sleep; then a wake-up."""
    assert await wakeups.after_batch(CONN, claimed=0, in_flight=False, recheck_soon=False) == 0
    assert await wakeups.after_batch(CONN, claimed=0, in_flight=False, recheck_soon=False) == 5.0
    assert wakeups.slept


async def test_a_relay_sleeps_only_after_one_more_poll_under_the_idle_lock() -> None:
    ledger = IdleLockLedger()
    wakeups = wakeups_over(ledger)
    await sleep_then_wake(wakeups)
    assert ledger.statements == ["take"]
    assert ledger.depth == 1


async def test_woken_with_rows_the_idle_lock_goes_back_beside_their_publish() -> None:
    ledger = IdleLockLedger()
    wakeups = wakeups_over(ledger)
    await sleep_then_wake(wakeups)
    # Rows claimed: publish at once, nothing between the claim and the publish.
    assert await wakeups.after_batch(CONN, claimed=3, in_flight=False, recheck_soon=False) == 0
    assert ledger.statements == ["take"]
    await wakeups.release_alongside(CONN)  # beside the publish
    await wakeups.release_alongside(CONN)  # the next step: nothing more to give back
    assert ledger.statements == ["take", "release"]
    assert ledger.depth == 0
    assert not wakeups.slept


async def test_the_idle_lock_is_never_taken_twice() -> None:
    ledger = IdleLockLedger()
    wakeups = wakeups_over(ledger)
    await sleep_then_wake(wakeups)
    await wakeups.after_batch(CONN, claimed=3, in_flight=False, recheck_soon=False)
    # No step ran the release (say, NATS went away meanwhile); the outbox is empty.
    await wakeups.after_batch(CONN, claimed=0, in_flight=False, recheck_soon=False)
    assert ledger.statements == ["take", "release", "take"]
    assert ledger.depth == 1  # not 2: a nested lock would outlive its release


async def test_producers_in_flight_keep_a_relay_from_sleeping_blind() -> None:
    ledger = IdleLockLedger(free=False)
    wakeups = wakeups_over(ledger)
    wait = await wakeups.after_batch(CONN, claimed=0, in_flight=False, recheck_soon=False)
    assert wait == 5.0  # wait_for_producers wakes it sooner
    assert not wakeups.slept
    assert ledger.statements == ["take", "held elsewhere?"]


async def test_an_ordered_relay_asleep_looks_at_its_partitions_often() -> None:
    wakeups = wakeups_over(IdleLockLedger(), ordered=True)
    await wakeups.after_batch(CONN, claimed=0, in_flight=False, recheck_soon=False)
    assert await wakeups.after_batch(CONN, claimed=0, in_flight=False, recheck_soon=False) == 2.0


def test_a_throttle_lets_the_first_line_through_and_counts_the_rest() -> None:
    throttle = _Throttle(every=60.0)
    assert throttle.due() == 0
    assert [throttle.due() for _ in range(3)] == [None, None, None]
    throttle.reset()  # reconnected: the next outage's first error is news again
    assert throttle.due() == 0
