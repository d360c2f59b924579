"""The fast-ingest protocol's rules: reply subjects, the server's answers, and what a
batch makes of them (the answers as nats-server 2.15 gives them)."""

import nats.js.errors

from outbox_relay.fast_ingest import (
    BatchState,
    FlowAck,
    Operation,
    Refused,
    Stored,
    answered_message,
    batch_prefix,
    operation,
    parse_answer,
    reply_subject,
    server_supports,
    window_open,
)

TOO_LARGE = (
    b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum '
    b'allowed"},"stream":"t","seq":0}'
)
UNKNOWN_BATCH = b'{"error":{"code":400,"err_code":10208,"description":"batch publish ID unknown"}}'


def test_reply_subjects_carry_the_batch_and_read_back() -> None:
    prefix = batch_prefix("_INBOX.abc", "b1", 500)
    assert reply_subject(prefix, 7, Operation.APPEND) == "_INBOX.abc.b1.500.fail.7.1.$FI"
    assert answered_message("b1.500.fail.7.1.$FI") == ("b1", 7)
    assert answered_message("b1") == ("b1", 0)


def test_the_first_message_starts_and_the_last_commits() -> None:
    assert [operation(n, 3) for n in (1, 2, 3)] == [
        Operation.START,
        Operation.APPEND,
        Operation.COMMIT,
    ]
    assert operation(1, 1) is Operation.COMMIT  # a batch of one commits at once


def test_answers_parse_without_raising() -> None:
    assert parse_answer(b'{"type":"ack","seq":10,"msgs":10}') == FlowAck(10, 10)
    assert parse_answer(b'{"stream":"t","seq":2,"batch":"b","count":2}') == Stored(2)
    assert parse_answer(b'{"type":"gap","last_seq":3,"seq":4}') == Refused(0, None)
    refused = parse_answer(b'{"type":"err","seq":3,"error":{"code":400,"err_code":10060}}')
    assert isinstance(refused, Refused)
    assert refused.sequence == 3
    assert refused.error is not None
    assert refused.error.err_code == 10060
    error = parse_answer(TOO_LARGE)
    assert isinstance(error, nats.js.errors.APIError)
    assert error.err_code == 10054
    assert isinstance(parse_answer(b"not json"), nats.js.errors.APIError)
    assert isinstance(parse_answer(b"[1]"), nats.js.errors.APIError)


def test_a_message_refused_before_joining_the_batch_ends_it_there() -> None:
    batch = BatchState(flow=500)
    batch.take(1, FlowAck(0, 500))
    batch.take(3, parse_answer(TOO_LARGE))
    batch.take(4, parse_answer(UNKNOWN_BATCH))  # later messages: nothing new
    assert batch.refused is not None
    assert batch.refused.sequence == 3
    assert batch.error is None
    assert not batch.ended  # the PubAck saying what was stored is still to come
    batch.take(4, Stored(2))
    assert batch.ended
    assert batch.stored == 2


def test_a_refused_first_message_means_the_stream_takes_no_batches() -> None:
    batch = BatchState(flow=500)
    batch.take(1, parse_answer(b'{"error":{"code":400,"err_code":10205,"description":"disabled"}}'))
    assert batch.ended
    assert batch.error is not None
    assert batch.error.err_code == 10205


def test_at_most_two_flow_windows_go_unacknowledged() -> None:
    batch = BatchState(flow=500)
    batch.take(1, FlowAck(0, 100))  # the server grants less than asked
    assert window_open(199, batch)
    assert not window_open(200, batch)
    batch.take(100, FlowAck(100, 100))
    assert window_open(299, batch)
    assert not window_open(300, batch)


def test_fast_batches_need_nats_server_2_14() -> None:
    assert not server_supports((2, 12, 1))
    assert server_supports((2, 14, 0))
