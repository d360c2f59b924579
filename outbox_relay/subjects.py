"""NATS subject rules, shared by the producer API and the relay's configuration."""

from __future__ import annotations

import re

from outbox_relay.errors import InvalidSubjectError

# Mirrors the CHECK constraint on the outbox table (sql/migrations/0001_initial.sql).
_PART = r"[^\s\x00-\x1f\x7f.*>]+"
_SUBJECT = re.compile(rf"{_PART}(?:\.{_PART})*")
# A publish's subject travels in its control line, which nats-server caps at 4096
# bytes (max_control_line) and answers by closing the connection. The rest of the
# line (verb, reply inbox, sizes) takes well under 96 bytes.
MAX_SUBJECT_BYTES = 4000


def validate_subject(subject: str) -> str:
    """Return ``subject`` if a JetStream publish may use it, else raise with the reason."""
    if not _SUBJECT.fullmatch(subject):
        raise InvalidSubjectError(f"invalid subject {subject!r}: {_subject_problem(subject)}")
    try:
        size = len(subject.encode())
    except UnicodeEncodeError:
        raise InvalidSubjectError(f"invalid subject {subject!r}: not valid Unicode") from None
    if size > MAX_SUBJECT_BYTES:
        raise InvalidSubjectError(
            f"invalid subject {subject[:40]!r}...: {size} bytes, "
            f"over the maximum of {MAX_SUBJECT_BYTES}"
        )
    return subject


def validate_filter(pattern: str) -> str:
    """Return ``pattern`` if it is a subject or a NATS wildcard pattern (``*`` a whole
    token, ``>`` a whole last token), else raise with the reason."""
    tokens = pattern.split(".")
    concrete = [
        "x" if t == "*" or (t == ">" and i == len(tokens) - 1) else t for i, t in enumerate(tokens)
    ]
    try:
        validate_subject(".".join(concrete))
    except InvalidSubjectError as exc:
        raise InvalidSubjectError(
            f"invalid filter {pattern!r}: '*' and '>' must be whole tokens, '>' the last ({exc})"
        ) from None
    return pattern


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, ``>`` one or more trailing tokens."""
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for i, part in enumerate(pattern_tokens):
        if part == ">":
            return len(subject_tokens) > i
        if i >= len(subject_tokens) or part not in ("*", subject_tokens[i]):
            return False
    return len(subject_tokens) == len(pattern_tokens)


def event_subject(prefix: str, event_type: str) -> str:
    """``<prefix>.<event_type>``, e.g. ``noetl.events.command.issued``."""
    if not event_type:
        raise InvalidSubjectError("invalid event_type '': it must not be empty")
    return validate_subject(f"{prefix}.{event_type}")


def _subject_problem(subject: str) -> str:
    if not subject:
        return "it is empty"
    if any(ch.isspace() for ch in subject):
        return "it contains white space"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in subject):
        return "it contains a control character"
    if "*" in subject or ">" in subject:
        return "'*' and '>' are wildcards and cannot be published to"
    return "tokens between dots must not be empty"
