from outbox_relay.atomic import (
    BATCH_COMMIT_HEADER,
    BATCH_HEADER_BYTES,
    BATCH_ID_HEADER,
    BATCH_SEQUENCE_HEADER,
    MAX_BATCH_MESSAGES,
    batch_headers,
    server_supports,
    split,
)
from outbox_relay.headers import wire_size
from outbox_relay.publish import Ack, parse_ack


def test_batches_keep_the_order_and_stay_within_the_server_limit() -> None:
    items = list(range(2 * MAX_BATCH_MESSAGES + 1))
    batches = split(items)
    assert [len(b) for b in batches] == [MAX_BATCH_MESSAGES, MAX_BATCH_MESSAGES, 1]
    assert [i for b in batches for i in b] == items
    assert split([]) == []


def test_only_the_last_message_commits_and_the_row_headers_are_kept() -> None:
    row = {"Nats-Msg-Id": "42"}
    first = batch_headers(row, "b", 1, commit=False)
    last = batch_headers(row, "b", 2, commit=True)
    assert first == {"Nats-Msg-Id": "42", BATCH_ID_HEADER: "b", BATCH_SEQUENCE_HEADER: "1"}
    assert last[BATCH_COMMIT_HEADER] == "1"
    assert last[BATCH_SEQUENCE_HEADER] == "2"
    assert row == {"Nats-Msg-Id": "42"}  # the row's own headers are not changed


def test_the_batch_header_allowance_covers_the_widest_batch_headers() -> None:
    widest = batch_headers({}, "f" * 32, MAX_BATCH_MESSAGES, commit=True)
    assert wire_size(widest, 0) - wire_size({}, 0) == BATCH_HEADER_BYTES


def test_batches_need_a_server_that_dedups_msg_ids_in_them() -> None:
    assert not server_supports((2, 9, 10))
    assert not server_supports((2, 12, 0))  # refuses Nats-Msg-Id in a batch
    assert server_supports((2, 12, 1))
    assert server_supports((2, 15, 1))


def test_a_batch_puback_says_how_many_messages_it_committed() -> None:
    assert parse_ack(b'{"stream":"s","seq":9,"batch":"b","count":3}', None) == Ack("s", 9, False, 3)
    assert parse_ack(b'{"stream":"s","seq":9}', None) == Ack("s", 9, False, 0)
