"""NATS publish frames, encoded a batch at a time.

nats-py's ``publish`` encodes one message per call, re-checking every header name
against a pattern and rewriting every value, and that was the larger part of the
relay's CPU time. The relay's rows are checked before they get here (subjects by
:func:`~outbox_relay.subjects.validate_subject`, headers by
:mod:`~outbox_relay.headers`), so a batch's frames are encoded here, byte for byte
as nats-py would, and handed to the client in one write
(:class:`~outbox_relay.channel.FrameWriter`).
"""

from __future__ import annotations

from collections.abc import Mapping

_HEADER_LINE = "NATS/1.0\r\n"


def header_block(headers: Mapping[str, str]) -> bytes:
    """The header block before the payload: the version line, a line per header, a
    blank line. Values are stripped, as nats-py does."""
    lines = "".join(f"{name}: {value.strip()}\r\n" for name, value in headers.items())
    return f"{_HEADER_LINE}{lines}\r\n".encode()


def hpub(subject: str, reply: str, headers: Mapping[str, str], payload: bytes) -> bytes:
    """One ``HPUB`` frame: the control line, the header block, the payload."""
    block = header_block(headers)
    size = len(block)
    line = f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode()
    return b"".join((line, block, payload, b"\r\n"))
