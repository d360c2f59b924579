import nats.errors
import nats.js.errors
import pytest

from outbox_relay.publish import (
    MSG_ID_HEADER,
    Ack,
    Kind,
    classify,
    message_headers,
    parse_ack,
    wire_size,
)
from outbox_relay.store import OutboxMessage


def test_message_headers_carry_the_event_id_and_the_expected_stream() -> None:
    message = OutboxMessage(1, "770446870097952768", "a.b", b"{}", {"traceparent": "00-x"})
    assert message_headers(message, "noetl_events", ordered=True) == {
        "traceparent": "00-x",
        MSG_ID_HEADER: "770446870097952768",
        "Nats-Expected-Stream": "noetl_events",
    }


def test_keyed_rows_carry_their_key_and_publish_sequence_in_ordered_mode_only() -> None:
    message = OutboxMessage(7, "42", "a.b", b"{}", None, ordering_key="9", sequence=3 << 20)
    ordered = message_headers(message, "s", ordered=True)
    assert ordered["Outbox-Ordering-Key"] == "9"
    assert ordered["Outbox-Sequence"] == str(3 << 20)  # the claim's, not the outbox id
    unordered = message_headers(message, "s", ordered=False)
    assert "Outbox-Ordering-Key" not in unordered
    assert "Outbox-Sequence" not in unordered


def test_parse_ack_reads_acks_duplicates_and_errors_without_raising() -> None:
    assert parse_ack(b'{"stream":"s","seq":7}', None) == Ack("s", 7, False)
    assert parse_ack(b'{"stream":"s","seq":7,"duplicate":true}', None) == Ack("s", 7, True)
    error = parse_ack(
        b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum'
        b' allowed"}}',
        None,
    )
    assert isinstance(error, nats.js.errors.APIError)
    assert (error.code, error.err_code) == (400, 10054)
    assert isinstance(parse_ack(b"", "503"), nats.js.errors.NoStreamResponseError)
    assert isinstance(parse_ack(b"not json", None), nats.js.errors.APIError)


def test_wire_size_counts_the_header_block() -> None:
    # NATS/1.0\r\n + "Nats-Msg-Id: 42\r\n" + \r\n, then the payload.
    assert wire_size({"Nats-Msg-Id": "42"}, 10) == 10 + len("Nats-Msg-Id: 42\r\n") + 2 + 10


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (nats.js.errors.NoStreamResponseError(), Kind.NO_STREAM),
        (nats.js.errors.APIError(code=400, err_code=10054, description="message size"), Kind.ROW),
        (
            nats.js.errors.APIError(code=400, err_code=10060, description="expected stream"),
            Kind.ROW,
        ),
        (
            nats.js.errors.APIError(code=503, err_code=10008, description="unavailable"),
            Kind.TRANSIENT,
        ),
        (nats.errors.MaxPayloadError(), Kind.ROW),
        (nats.errors.BadSubjectError(), Kind.ROW),
        (nats.errors.TimeoutError(), Kind.TRANSIENT),
        (nats.errors.ConnectionClosedError(), Kind.TRANSIENT),
        (nats.errors.OutboundBufferLimitError(), Kind.TRANSIENT),
    ],
)
def test_classify_blames_the_row_only_for_row_problems(error: Exception, kind: Kind) -> None:
    got, reason = classify(error)
    assert got is kind
    assert reason


@pytest.mark.parametrize(
    "error",
    [
        nats.js.errors.APIError(code=429, err_code=10167, description="too many requests"),
        nats.js.errors.APIError(code=400, err_code=10167, description="too many requests"),
        nats.js.errors.APIError(code=429, err_code=None, description="slow down"),
    ],
)
def test_overload_and_flow_control_are_outages_not_the_rows_fault(error: Exception) -> None:
    assert classify(error)[0] is Kind.TRANSIENT
