from collections import Counter
from datetime import UTC, datetime

from outbox_relay.ids import SnowflakeGenerator, split_id
from outbox_relay.verify import Window, classify_ids


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
