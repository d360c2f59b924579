import time

import anyio

from outbox_relay.relay import Backoff, Wakeup


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
