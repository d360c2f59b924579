"""Frames the relay encodes itself are the bytes nats-py's own publish would send."""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from outbox_relay import frames
from outbox_relay.errors import InvalidHeadersError
from outbox_relay.headers import sendable_headers

VALUES = st.text(st.characters(exclude_characters="\r\n\x00"), max_size=20)
NAMES = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}", fullmatch=True)


async def nats_py_frame(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    """What nats-py's publish hands its write buffer for this message."""
    sent: list[bytes] = []
    nc = Client()

    async def capture(command: bytes, priority: bool = False) -> None:
        sent.append(command)

    nc._send_command = capture  # type: ignore[method-assign,assignment]
    nc._flush_queue = None
    await nc._send_publish(subject, reply, payload, len(payload), headers)
    return sent[0]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(NAMES, VALUES, min_size=1, max_size=5),
    st.sampled_from(["", "_INBOX.abc.17.fail.3.1.$FI"]),
    st.binary(max_size=64),
)
async def test_a_frame_is_what_nats_py_would_send(
    headers: dict[str, str], reply: str, payload: bytes
) -> None:
    try:
        checked: dict[str, Any] = sendable_headers(headers)
    except InvalidHeadersError:
        return
    expected = await nats_py_frame("noetl.events.command.issued", reply, checked, payload)
    assert frames.hpub("noetl.events.command.issued", reply, checked, payload) == expected


@pytest.mark.parametrize("value", [" padded ", "é", ""])
async def test_values_are_stripped_and_utf8_as_nats_py_sends_them(value: str) -> None:
    headers = {"Nats-Msg-Id": value}
    expected = await nats_py_frame("a.b", "r", headers, b"x")
    assert frames.hpub("a.b", "r", headers, b"x") == expected
