"""Fuzz target: subject and header validation take any input and either accept what NATS
can carry or raise their typed error, nothing else.

Each test is also an entry point for a coverage-guided fuzzer, e.g. with atheris:
``atheris.Setup(sys.argv, test_headers_fuzz.hypothesis.fuzz_one_input)``.
"""

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from outbox_relay.errors import InvalidHeadersError, InvalidSubjectError
from outbox_relay.headers import (
    MAX_STREAM_NAME_BYTES,
    RESERVED_HEADERS,
    header_overhead,
    over_max_payload,
    sendable_headers,
    validate_headers,
    wire_size,
)
from outbox_relay.subjects import MAX_SUBJECT_BYTES, validate_subject

# Text with what breaks lines, NATS parsing or UTF-8: controls, blanks, surrogates.
NASTY_TEXT = st.text(st.characters(categories=["Cc", "Cs", "Zs", "Ll", "Lu", "Po", "Sm"]))
# Anything a jsonb object or a careless caller could hand over as a header value.
VALUES = st.one_of(
    st.text(),
    NASTY_TEXT,
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.text(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
TOKENS = st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=8)
SUBJECTS = st.one_of(
    st.text(),
    NASTY_TEXT,
    st.lists(TOKENS, min_size=1, max_size=6).map(".".join),
    st.integers(0, 5000).map(lambda n: "a." + "b" * n),
)
FUZZ = settings(max_examples=200, deadline=None)


@FUZZ
@given(SUBJECTS)
def test_subjects_fuzz(subject: str) -> None:
    try:
        accepted = validate_subject(subject)
    except InvalidSubjectError:
        return
    assert len(accepted.encode()) <= MAX_SUBJECT_BYTES
    assert all(token for token in accepted.split("."))
    assert not any(ch.isspace() or ord(ch) < 0x20 or ch in "*>" for ch in accepted)


@FUZZ
@given(
    st.one_of(
        st.dictionaries(st.one_of(st.text(max_size=12), NASTY_TEXT), VALUES, max_size=5), VALUES
    )
)
def test_headers_fuzz(headers: Any) -> None:
    try:
        sendable = sendable_headers(headers)
    except InvalidHeadersError:
        return
    for name, value in sendable.items():
        assert isinstance(value, str)
        assert not any(ch in value for ch in "\r\n\x00")
        assert name.isascii()
        assert ":" not in name
        assert name.strip() == name
    assert wire_size(sendable, 0) >= 12
    try:
        checked = validate_headers(headers)
    except InvalidHeadersError:
        return
    assert not {name.lower() for name in checked} & RESERVED_HEADERS
    # The producer's reserve covers any stream name and outbox id the relay may add.
    assert header_overhead(checked, "m", "k") >= wire_size(checked, 0) + MAX_STREAM_NAME_BYTES


@FUZZ
@given(
    st.dictionaries(st.text(max_size=12), st.one_of(st.text(), NASTY_TEXT), max_size=5),
    st.integers(0, 2000),
)
def test_the_cheap_max_payload_check_agrees_with_the_exact_size(
    headers: dict[str, str], payload_size: int
) -> None:
    try:
        sendable = sendable_headers(headers)
    except InvalidHeadersError:
        return
    size = wire_size(sendable, payload_size)
    # Right at the limit, where a loose bound would err.
    assert over_max_payload(sendable, payload_size, size) == 0
    assert over_max_payload(sendable, payload_size, size - 1) == size
