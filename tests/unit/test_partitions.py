"""Partition ownership decisions and per-key publish waves (pure logic)."""

from outbox_relay.partitions import Plan, fair_share, plan, preference
from outbox_relay.publish import waves
from outbox_relay.queries import KEY_PARTITIONS
from outbox_relay.store import OutboxMessage


def test_fair_shares_cover_every_partition() -> None:
    for relays in range(1, 10):
        assert fair_share(KEY_PARTITIONS, relays) * relays >= KEY_PARTITIONS
        assert (fair_share(KEY_PARTITIONS, relays) - 1) * relays < KEY_PARTITIONS  # the least
    assert fair_share(64, 0) == 64  # a relay that cannot count others takes all


def test_preferences_are_rotations_that_start_apart() -> None:
    order = preference("relay-a")
    assert sorted(order) == list(range(KEY_PARTITIONS))
    assert order == [(order[0] + i) % KEY_PARTITIONS for i in range(KEY_PARTITIONS)]
    starts = {preference(f"host-{n}")[0] for n in range(8)}
    assert len(starts) > 1


def test_plan_gives_back_the_least_preferred_surplus_or_asks_for_the_rest() -> None:
    order = list(range(8))
    assert plan(frozenset(range(8)), 2, order) == Plan(release=(7, 6, 5, 4))
    assert plan(frozenset({0, 1}), 2, order) == Plan(take=2)
    assert plan(frozenset({0, 1, 2, 3}), 2, order) == Plan(take=0)
    assert plan(frozenset(), 3, order) == Plan(take=3)


def _message(row_id: int, key: str | None) -> OutboxMessage:
    return OutboxMessage(row_id, str(row_id), "a.b", b"", None, key)


def test_waves_put_each_keys_first_row_and_keyless_rows_first() -> None:
    batch = [_message(1, "x"), _message(2, None), _message(3, "x"), _message(4, "y")]
    batch += [_message(5, "x"), _message(6, None)]
    first, later = waves(batch)
    assert [m.id for m in first] == [1, 2, 4, 6]
    assert {key: [m.id for m in rows] for key, rows in later.items()} == {"x": [3, 5], "y": []}
