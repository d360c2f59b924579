from pathlib import Path

import pytest

from outbox_relay.cli import cli, settings_from
from outbox_relay.config import (
    DurableConsumer,
    NatsAuth,
    Settings,
    describe_database,
    format_duration,
    parse_duration,
    redact_url,
)
from outbox_relay.errors import ConfigError
from outbox_relay.jetstream import auth_options


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("120", 120.0),
        ("120s", 120.0),
        ("2m", 120.0),
        ("24h", 86400.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("1d", 86400.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1s", "5 parsecs", "1e3"])
def test_parse_duration_rejects_nonsense(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for text in ("2m", "1d", "90s", "0.5s"):
        assert format_duration(parse_duration(text)) == text


def test_defaults_follow_the_noetl_tailer_contract() -> None:
    s = Settings()
    assert (s.stream, s.subject_prefix, s.subject_wildcard) == (
        "noetl_events",
        "noetl.events",
        "noetl.events.>",
    )
    assert (s.duplicate_window, s.max_age) == (120.0, 86400.0)
    assert s.names.channel == "noetl.event_outbox"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "batch size"),
        ({"batch_size": 10_001}, "batch size"),
        ({"max_attempts": 0}, "max attempts"),
        ({"poll_interval": 0}, "poll interval"),
        ({"stream": "has.dot"}, "invalid stream name"),
        ({"stream": "has space"}, "invalid stream name"),
        ({"subject_prefix": "noetl.*"}, "subject prefix"),
        ({"subject_prefix": ""}, "subject prefix"),
        ({"nats_urls": ()}, "NATS URL list is empty"),
        ({"nats_urls": ("http://x:4222",)}, "invalid NATS URL"),
        ({"duplicate_window": 7200, "max_age": 3600}, "duplicate window must not exceed"),
        ({"retry_backoff": 10, "retry_backoff_max": 1}, "retry backoff max"),
        ({"schema": ""}, "schema name"),
        ({"schema": "x" * 60}, "schema name"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


def test_redact_url_hides_passwords_and_tokens() -> None:
    assert redact_url("nats://user:s3cret@host:4222") == "nats://user:***@host:4222"
    assert redact_url("nats://t0ken@host:4222") == "nats://***@host:4222"
    assert redact_url("nats://host:4222") == "nats://host:4222"


def test_describe_database_never_shows_the_password() -> None:
    shown = describe_database("postgresql://app:s3cret@db.example:6543/events")
    assert shown == "app@db.example:6543/events"
    shown = describe_database("host=db user=app password=s3cret dbname=events")
    assert "s3cret" not in shown
    assert shown == "app@db/events"


def test_nats_auth_is_checked_up_front(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not several"):
        NatsAuth(token="t", user="u", password="p")
    with pytest.raises(ConfigError, match="go together"):
        NatsAuth(user="u")
    with pytest.raises(ConfigError, match="go together"):
        NatsAuth(tls_cert_file=__file__)
    with pytest.raises(ConfigError, match="no such file"):
        NatsAuth(creds_file=str(tmp_path / "missing.creds"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="TLS files unusable"):
        auth_options(NatsAuth(tls_ca_file=str(garbage)))


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings(
        database_url="postgresql://app:db-s3cret@db/app",
        nats_auth=NatsAuth(user="u", password="nats-s3cret"),
    )
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in repr(NatsAuth(token="tok-s3cret"))


def test_each_nats_auth_method_maps_to_its_client_option() -> None:
    assert auth_options(NatsAuth()) == {}
    assert auth_options(NatsAuth(user="u", password="p")) == {"user": "u", "password": "p"}
    assert auth_options(NatsAuth(token="t")) == {"token": "t"}
    assert auth_options(NatsAuth(creds_file=__file__)) == {"user_credentials": __file__}
    assert auth_options(NatsAuth(nkey_seed_file=__file__)) == {"nkeys_seed": __file__}


def test_durable_consumers_parse_from_one_word_each() -> None:
    assert DurableConsumer.parse("noetl_projector:noetl.events.>") == DurableConsumer(
        "noetl_projector", "noetl.events.>", "explicit"
    )
    assert DurableConsumer.parse("audit:noetl.events.*.failed:all").ack_policy == "all"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("noetl_projector", "use name:filter"),
        ("a.b:noetl.events.>", "invalid consumer name"),
        ("p:noetl.events.>:sometimes", "ack policy must be explicit, all or none"),
        ("p:noetl..events", "filter"),
        ("p:noetl.events.>.x", "filter"),
    ],
)
def test_bad_durable_consumers_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DurableConsumer.parse(text)


def test_a_consumer_filter_outside_the_stream_is_refused() -> None:
    with pytest.raises(ConfigError, match="outside the stream's subjects"):
        Settings(consumers=(DurableConsumer("p", "other.events.>"),))


def test_consumers_come_from_one_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "OUTBOX_CONSUMERS",
        "noetl_projector:noetl.events.> noetl_result_materializer:noetl.events.>:explicit",
    )
    context = cli.commands["run"].make_context("run", [])
    consumers = settings_from(dict(context.params)).consumers
    assert [c.name for c in consumers] == ["noetl_projector", "noetl_result_materializer"]


def test_describe_database_shows_libpqs_defaults_not_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With nothing set, libpq goes to the local socket as the login user."""
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    assert describe_database("") == "alice@local socket .s.PGSQL.5432/alice"
    monkeypatch.setenv("PGPORT", "6543")
    assert describe_database("dbname=events") == "alice@local socket .s.PGSQL.6543/events"
