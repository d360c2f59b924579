import pytest

from outbox_relay.errors import InvalidSubjectError
from outbox_relay.subjects import event_subject, subject_matches, validate_subject

VALID = ["noetl.events.command.issued", "a", "a.b-c_d.E9", "ünïcode.ok", "x.$JS-like"]
INVALID = {
    "": "empty",
    "a..b": "tokens between dots",
    ".a": "tokens between dots",
    "a.": "tokens between dots",
    "a b": "white space",
    "a.\tb": "white space",
    "a.*": "wildcards",
    "a.>": "wildcards",
    "a.b*c": "wildcards",
    "a\x00b": "control character",
}


@pytest.mark.parametrize("subject", VALID)
def test_valid_subjects_pass(subject: str) -> None:
    assert validate_subject(subject) == subject


@pytest.mark.parametrize(("subject", "reason"), INVALID.items())
def test_invalid_subjects_say_why(subject: str, reason: str) -> None:
    with pytest.raises(InvalidSubjectError, match=reason):
        validate_subject(subject)


def test_event_subject_keeps_dotted_event_types() -> None:
    assert event_subject("noetl.events", "command.issued") == "noetl.events.command.issued"


@pytest.mark.parametrize("event_type", ["", "bad type", "a..b", "*"])
def test_event_subject_rejects_bad_event_types(event_type: str) -> None:
    with pytest.raises(InvalidSubjectError):
        event_subject("noetl.events", event_type)


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("noetl.events.>", "noetl.events.command.issued", True),
        ("noetl.events.>", "noetl.events", False),
        ("noetl.*.x", "noetl.events.x", True),
        ("noetl.*.x", "noetl.events.y", False),
        ("noetl.events", "noetl.events", True),
        ("noetl.events", "noetl.events.x", False),
        ("*", "a.b", False),
    ],
)
def test_subject_matches_follows_nats_wildcards(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches
