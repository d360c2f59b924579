from array import array
from collections import Counter
from datetime import UTC, datetime

from outbox_relay.ids import SnowflakeGenerator, split_id
from outbox_relay.verify import (
    Window,
    _Committed,
    _execution_hash,
    classify_ids,
    event_key,
    event_row,
    out_of_order,
)


def test_every_class_is_found() -> None:
    committed = {1, 2, 3, 4}
    waiting = {3}
    stored = Counter({1: 1, 2: 2, 9: 1})
    report = classify_ids(committed, waiting, stored)
    assert report.ok == 1
    assert report.duplicate == {2: 2}
    assert report.pending == [3]
    assert report.lost == [4]
    assert report.unexpected == [9]
    assert not report.clean
    summary = report.as_dict()
    assert {k: summary[k] for k in ("ok", "pending", "lost", "duplicate", "unexpected")} == {
        "ok": 1,
        "pending": 1,
        "lost": 1,
        "duplicate": 1,
        "unexpected": 1,
    }


def test_pending_alone_is_clean() -> None:
    assert classify_ids({1, 2}, {2}, Counter({1: 1})).clean


def test_a_time_window_covers_the_ids_minted_in_it() -> None:
    since = datetime.now(UTC)
    snowflake = SnowflakeGenerator(31).next_id()
    window = Window.between(since, datetime.now(UTC))
    assert snowflake in window
    assert split_id(window.from_id or 0)[0] <= split_id(snowflake)[0]
    assert (snowflake + (1 << 30)) not in window


def test_out_of_order_finds_a_row_stored_after_a_later_row_of_its_key() -> None:
    # (event id, key, outbox sequence), in stream order
    in_order = [(1, "a", 10), (2, "b", 11), (3, "a", 12), (4, "b", 13)]
    assert out_of_order(in_order) == []
    swapped = [(1, "a", 10), (3, "a", 12), (2, "a", 11), (4, "a", 13)]
    assert out_of_order(swapped) == [2]
    # A stale copy landing after later events of its key (a frame a relay wrote on a
    # stalled link, delivered at the heal) is out of order, not only a duplicate ...
    assert out_of_order([(1, "a", 10), (2, "a", 11), (1, "a", 10)]) == [1]
    # ... a copy published again later, with a later sequence, is only a duplicate.
    assert out_of_order([(1, "a", 10), (2, "a", 11), (1, "a", 12)]) == []
    # Keys are independent.
    assert out_of_order([(5, "b", 20), (1, "a", 10)]) == []


def test_strict_order_reads_the_database_order_where_sequences_agree_with_the_relay() -> None:
    # A relay that claimed row 3 before row 2 of its key numbered them in that order.
    passed_over = [(1, "a", 10), (3, "a", 11), (2, "a", 12), (4, "a", 13)]
    assert out_of_order(passed_over) == []
    assert out_of_order(passed_over, by_event_id=True) == [2]
    assert out_of_order([(5, "b", 20), (1, "a", 21)], by_event_id=True) == []


def test_event_key_reads_the_key_column_as_sql_text_renders_it() -> None:
    def key(payload: bytes, column: str | None = "execution_id") -> str | None:
        return event_key(event_row(payload), column)

    assert key(b'{"execution_id": 42, "event_id": 7}') == "42"
    assert key(b'{"order": "o-1"}', "order") == "o-1"
    assert key(b'{"execution_id": null}') is None
    assert key(b'{"event_id": 7}') is None
    assert key(b"not json") is None
    assert key(b"[1, 2]") is None
    assert key(b'{"execution_id": 42}', None) is None


def test_the_compact_store_counts_and_classifies_as_the_sets_did() -> None:
    committed = _Committed()
    # (execution, event) in event id order; event 30 committed by two executions.
    for execution_id, event_id in [(1, 10), (1, 20), (None, 25), (1, 30), (2, 30), (1, 40)]:
        committed.ids.append(event_id)
        committed.executions.append(_execution_hash(execution_id))
    committed.copies = bytearray(len(committed.ids))
    assert committed.count(1, 10)
    assert committed.count(None, 20)  # no execution named: its event id's only row
    assert committed.count(None, 25)
    assert not committed.count(2, 20)  # another execution's event 20: never committed
    assert not committed.count(None, 30)  # two rows: which one is unknown
    assert committed.count(2, 30)
    assert committed.count(2, 30)
    assert not committed.count(1, 99)
    # Rows read up front, which a late look-up must not classify again.
    assert committed.holds((1, 10))
    assert not committed.holds((2, 10))
    assert committed.holds((None, 25))
    assert not committed.holds((None, 10))
    waiting = array("q", [40])
    report = committed.classify(waiting)
    assert (report.ok, report.duplicate, report.lost, report.pending, report.collided) == (
        3,
        {30: 2},
        [30],
        [40],
        [30],
    )


def test_execution_stand_ins_fit_32_bits_and_keep_none_apart() -> None:
    for execution_id in (0, 1, -1, 2**62, 2**63 - 1, -(2**63), 4_294_967_290):
        assert -(2**31) < _execution_hash(execution_id) < 2**31
    assert _execution_hash(None) == -(2**31)


def test_a_time_window_far_in_the_future_stays_within_bigint() -> None:
    window = Window.between(datetime(2020, 1, 1, tzinfo=UTC), datetime(2999, 1, 1, tzinfo=UTC))
    assert window.from_id == 0
    assert window.to_id == 2**63 - 1
