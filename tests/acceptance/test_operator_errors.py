"""What an operator sees when a server or a setting is not as expected: one line on
stderr and the README's exit code, never a traceback or a warning before it."""

import signal
import socket
from pathlib import Path

import anyio
import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres, connected_to
from outbox_relay.embedded import EmbeddedNats
from tests.acceptance.cli import RelayProcess, Result, env_for, outbox_relay, relay_process
from tests.helpers import producer_for, wait_until

pytestmark = pytest.mark.slow


def one_line(result: Result, exit_code: int, message: str) -> None:
    assert result.returncode == exit_code, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-relay: "), lines[0]
    assert message in lines[0]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--batch-size", "x"],
        ["run", "--no-such-flag"],
        ["no-such-command"],
        ["verify", "--json", "x"],
    ],
)
async def test_usage_errors_are_one_line(outbox: Settings, args: list[str]) -> None:
    result = await outbox_relay(*args, env=env_for(outbox))
    one_line(result, 2, "--help")


@pytest.mark.parametrize("command", ["run", "check", "verify"])
async def test_nats_down_is_one_line_without_warnings_before_it(
    outbox: Settings, command: str
) -> None:
    env = env_for(
        outbox,
        OUTBOX_NATS_URL=f"nats://127.0.0.1:{_closed_port()}",
        OUTBOX_CONNECT_TIMEOUT="2s",
        OUTBOX_LOG_FORMAT="json",
    )
    one_line(await outbox_relay(command, env=env), 3, "cannot reach NATS")


@pytest.mark.parametrize("command", ["run", "check", "verify"])
async def test_jetstream_disabled_is_one_line(outbox: Settings, command: str) -> None:
    with EmbeddedNats(jetstream=False) as server:
        env = env_for(outbox, OUTBOX_NATS_URL=server.url, OUTBOX_LOG_FORMAT="json")
        result = await outbox_relay(command, env=env)
    one_line(result, 3, "JetStream is not available")
    assert "-js" in result.stderr


@pytest.mark.parametrize(("command", "exit_code"), [("run", 2), ("check", 5)])
async def test_another_stream_binding_the_subjects_is_named(
    outbox: Settings, nc: NATS, command: str, exit_code: int
) -> None:
    # NoETL's own publisher creates NOETL_EVENTS on the same subjects.
    other = f"{outbox.stream}_OTHER"
    await nc.jetstream().add_stream(StreamConfig(name=other, subjects=[outbox.subject_wildcard]))
    try:
        result = await outbox_relay(command, env=env_for(outbox, OUTBOX_LOG_FORMAT="json"))
    finally:
        await nc.jetstream().delete_stream(other)
    one_line(result, exit_code, f"another stream binds these subjects: {other}")
    assert "--stream" in result.stderr


@pytest.mark.parametrize(
    ("args", "missing"),
    [(["verify"], None), (["check"], None), (["verify", "--stream", "nosuch"], "nosuch")],
)
async def test_a_missing_stream_fails_the_check_with_exit_five(
    outbox: Settings, args: list[str], missing: str | None
) -> None:
    # Before the first run has created the stream, or a stream that is not there.
    result = await outbox_relay(*args, env=env_for(outbox))
    one_line(result, 5, f"stream {missing or outbox.stream} missing: start `outbox-relay run`")


async def test_check_prints_max_payload_and_warns_when_producers_may_exceed_it(
    outbox: Settings, nc: NATS
) -> None:
    await nc.jetstream().add_stream(
        StreamConfig(name=outbox.stream, subjects=[outbox.subject_wildcard])
    )
    above = str(2 * nc.max_payload)
    result = await outbox_relay("check", env=env_for(outbox, OUTBOX_MAX_PAYLOAD=above))
    assert result.returncode == 0, result.stderr
    assert f"nats max_payload: {nc.max_payload:,} bytes" in result.stdout
    assert f"is above the server's max_payload of {nc.max_payload:,}" in result.stderr
    assert "warning" not in (await outbox_relay("check", env=env_for(outbox))).stderr


@pytest.mark.usefixtures("fast_server")
@pytest.mark.parametrize(
    ("allowed", "path", "advice"),
    [
        ("none", "does not allow fast-ingest batch publish: one PubAck per", True),
        ("atomic", "does not allow fast-ingest batch publish: each claim is one atomic", True),
        ("batched", "allows fast-ingest batch publish: each claim is one flow-controlled", False),
    ],
)
async def test_check_says_which_batches_the_stream_takes(
    outbox: Settings, nc: NATS, allowed: str, path: str, advice: bool
) -> None:
    # An existing stream is the operator's: check tells what allowing batches gains.
    await nc.jetstream().add_stream(
        StreamConfig(
            name=outbox.stream,
            subjects=[outbox.subject_wildcard],
            allow_atomic=allowed == "atomic" or None,
            allow_batched=allowed == "batched" or None,
        )
    )
    result = await outbox_relay("check", env=env_for(outbox))
    assert result.returncode == 0, result.stderr
    assert f"nats publish: stream {outbox.stream} {path}" in result.stdout
    assert ("Set allow_batched: true on it" in result.stdout) is advice


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lag", "--watch", "--interval", "0"], "--interval"),
        (["verify", "--since", "1h", "--until", "2h"], "the window is empty"),
        (["verify", "--from-id", "10", "--to-id", "1"], "the window is empty"),
        (["replay", "--from-id", "10", "--to-id", "1"], "the window is empty"),
    ],
)
async def test_settings_that_could_only_spin_or_match_nothing_are_refused(
    outbox: Settings, args: list[str], message: str
) -> None:
    with anyio.fail_after(30):  # a spinning --watch would never return
        result = await outbox_relay(*args, env=env_for(outbox))
    one_line(result, 2, message)


async def test_migrate_run_and_demo_name_their_database(
    unmigrated: Settings, tmp_path: Path
) -> None:
    target = await _connected_to(unmigrated)
    migrated = await outbox_relay("migrate", env=env_for(unmigrated))
    assert f"in database {target}" in migrated.stdout, migrated.stdout
    env = env_for(unmigrated, OUTBOX_LOG_FORMAT="json")
    with relay_process(env, tmp_path / "relay.log") as relay:
        await wait_until(lambda: _logged(relay, "started"), within=30)
        relay.signal(signal.SIGTERM)
        relay.wait(timeout=15)
    assert f"database {target}" in relay.output()
    demo = await outbox_relay("demo", "--events", "5", env=env, within=120)
    assert f"in database {target}" in demo.stdout, demo.stdout + demo.stderr


async def _connected_to(settings: Settings) -> str:
    async with await connect_postgres(settings) as conn:
        return connected_to(conn)


async def _logged(relay: RelayProcess, text: str) -> bool:
    return text in relay.output()


async def test_demo_waits_for_its_own_events_not_the_whole_outbox(unmigrated: Settings) -> None:
    env = env_for(unmigrated)
    assert (await outbox_relay("migrate", env=env)).returncode == 0
    # Someone else's row that stays pending for minutes: bound by no stream.
    with psycopg.connect(unmigrated.database_url) as conn:
        producer_for(unmigrated).enqueue(conn, subject="nowhere.at.all", payload=b"x", msg_id="x")
    result = await outbox_relay("demo", "--events", "10", env=env, within=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 events committed and in stream" in result.stdout
