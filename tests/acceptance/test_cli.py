"""The product as its users meet it: the ``outbox-relay`` command in its own process."""

import contextlib
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import anyio
import orjson
import psycopg
import pytest
from nats.aio.client import Client as NATS
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.atomic import BATCH_COMMIT_HEADER, BATCH_ID_HEADER, BATCH_SEQUENCE_HEADER
from outbox_relay.config import Settings
from outbox_relay.producer import Producer
from outbox_relay.schema import latest_version
from tests.acceptance.cli import clean_env, env_for, outbox_relay, produce, relay_process
from tests.helpers import (
    assert_exactly_once,
    drained,
    emit_events,
    lag,
    stream_count,
    stream_messages,
    wait_until,
)

pytestmark = pytest.mark.slow


async def test_migrate_is_idempotent_and_lag_reports_json(unmigrated: Settings) -> None:
    env = env_for(unmigrated)
    first = await outbox_relay("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    second = await outbox_relay("migrate", env=env)
    assert second.returncode == 0
    assert "applied" not in second.stdout
    assert f"schema {unmigrated.schema} is at version {latest_version()}" in second.stdout

    empty = await outbox_relay("lag", "--json", env=env)
    assert orjson.loads(empty.stdout) == {
        "pending": 0,
        "oldest_age_seconds": 0.0,
        "dead_letters": 0,
        "held": 0,
    }
    emit_events(unmigrated, 2)
    table = await outbox_relay("lag", env=env)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["pending", "2"]
    report = orjson.loads((await outbox_relay("lag", "--json", env=env)).stdout)
    assert report["pending"] == 2
    assert report["oldest_age_seconds"] > 0


async def test_run_relays_then_exits_zero_on_sigterm(
    outbox: Settings, nc: NATS, tmp_path: Path
) -> None:
    with relay_process(env_for(outbox), tmp_path / "relay.log") as relay:
        ids = emit_events(outbox, 100)
        await wait_until(lambda: drained(outbox), within=30)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    assert_exactly_once(await stream_messages(nc, outbox), ids)
    assert "stopped: published 100 (0 duplicates)" in relay.output()


async def test_a_relay_killed_mid_stream_and_restarted_loses_nothing(
    outbox: Settings, nc: NATS, tmp_path: Path
) -> None:
    ids = emit_events(outbox, 3000)
    env = env_for(outbox, OUTBOX_BATCH_SIZE="50")

    async def some_published() -> bool:
        try:
            return await stream_count(nc, outbox) > 0
        except Exception:  # noqa: BLE001 - the relay has not created the stream yet
            return False

    with relay_process(env, tmp_path / "first.log") as first:
        await wait_until(some_published, within=30, interval=0.01)
        first.signal(signal.SIGKILL)
        first.wait(timeout=10)
    assert (await lag(outbox)).pending > 0, "the relay finished before it was killed"
    with relay_process(env, tmp_path / "second.log") as second:
        await wait_until(lambda: drained(outbox), within=60)
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=15) == 0
    assert_exactly_once(await stream_messages(nc, outbox), ids)


async def test_events_from_concurrent_producer_processes_arrive_exactly_once(
    outbox: Settings, nc: NATS, tmp_path: Path
) -> None:
    with relay_process(env_for(outbox), tmp_path / "relay.log") as relay:
        minted: list[int] = []

        async def one_producer(execution_id: int) -> None:
            minted.extend(await produce(outbox, execution_id, 250))

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for execution_id in range(1, 5):
                    tg.start_soon(one_producer, execution_id)
        ids = {str(i) for i in minted}
        assert len(ids) == len(minted) == 1000  # four processes, no id minted twice
        await wait_until(lambda: drained(outbox), within=60)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    messages = await stream_messages(nc, outbox)
    assert_exactly_once(messages, ids)
    for message in messages:
        event = orjson.loads(message.data)
        assert message.header is not None
        assert message.header.pop("Outbox-Sequence").isdigit()
        # Stored as atomic batches (a stream that allows those and not fast-ingest
        # ones), the batch headers stay on each message.
        if (batch_id := message.header.pop(BATCH_ID_HEADER, None)) is not None:
            assert len(batch_id) == 32
            assert message.header.pop(BATCH_SEQUENCE_HEADER).isdigit()
            assert message.header.pop(BATCH_COMMIT_HEADER, "1") == "1"
        assert message.header == {
            "Nats-Msg-Id": str(event["event_id"]),
            "Nats-Expected-Stream": outbox.stream,
            "Outbox-Ordering-Key": str(event["execution_id"]),
        }
        assert message.subject == f"{outbox.subject_prefix}.{event['event_type']}"
        assert event["context"] == {"i": int(event["node_name"].split("-")[1])}


@pytest.mark.parametrize(
    ("args", "overrides", "exit_code", "message"),
    [
        (["run", "--batch-size", "0"], {}, 2, "batch size must be between 1 and 10000"),
        (["run", "--poll-interval", "soon"], {}, 2, "invalid duration 'soon'"),
        (["run", "--nats-url", "http://x:1"], {}, 2, "invalid NATS URL"),
        (["run", "--nats-url", "nats://127.0.0.1:42x2"], {}, 2, "port must be a number"),
        (["check", "--nats-url", "nats://u:s3cret@127.0.0.1:99999"], {}, 2, "port must be"),
        (
            ["run", "--nats-url", "nats://127.0.0.1:4222;nats://127.0.0.1:4223"],
            {},
            2,
            "separate several URLs with commas",
        ),
        (["run"], {"OUTBOX_DATABASE_URL": "postgres//app:s3cret@x"}, 2, "neither a libpq URL"),
        (["lag"], {"OUTBOX_DATABASE_URL": "host=x port"}, 2, "neither a libpq URL"),
        (["verify", "--since", "2099-01-01"], {}, 2, "is in the future"),
        (["replay", "--since", "2099-01-01", "--dry-run"], {}, 2, "is in the future"),
        (["run", "--subject-prefix", "a.*"], {}, 2, "wildcards"),
        (
            ["run"],
            {"OUTBOX_DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:9/none"},
            3,
            "cannot connect to PostgreSQL at app@127.0.0.1:9/none",
        ),
        (
            ["migrate"],
            {"OUTBOX_DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:9/none"},
            3,
            "cannot connect to PostgreSQL",
        ),
        (["run"], {"OUTBOX_NATS_URL": "nats://u:s3cret@127.0.0.1:9"}, 3, "cannot reach NATS"),
        (["run"], {"OUTBOX_SCHEMA": "never_migrated"}, 4, "run `outbox-relay migrate`"),
        (["lag"], {"OUTBOX_SCHEMA": "never_migrated"}, 4, "run `outbox-relay migrate`"),
        (["check"], {"OUTBOX_STREAM": "no_such_stream"}, 5, "stream no_such_stream missing"),
        (
            ["migrate"],
            {"OUTBOX_SCHEMA": "no_event_table", "OUTBOX_CREATE_EVENT_TABLE": ""},
            2,
            "no event table",
        ),
    ],
)
async def test_user_mistakes_get_one_line_and_an_exit_code(
    outbox: Settings, args: list[str], overrides: dict[str, str], exit_code: int, message: str
) -> None:
    result = await outbox_relay(*args, env={**env_for(outbox), **overrides})
    output = result.stdout + result.stderr
    assert result.returncode == exit_code, output
    assert message in output
    assert "Traceback" not in output
    assert "s3cret" not in output


@pytest.mark.parametrize("command", ["check", "migrate"])
async def test_a_read_only_server_is_named_as_such(outbox: Settings, command: str) -> None:
    """A standby answers like this too; it used to pass check and fail migrate raw."""
    url = make_conninfo(outbox.database_url, options="-c default_transaction_read_only=on")
    result = await outbox_relay(command, env=env_for(outbox, OUTBOX_DATABASE_URL=url))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "is read-only (a standby?)" in result.stderr
    assert result.stderr.count("\n") == 1
    assert "ok" not in result.stdout


async def test_migrate_refuses_a_schema_newer_than_it_knows(outbox: Settings) -> None:
    with psycopg.connect(outbox.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} (version, name) VALUES (%s, 'from_the_future')").format(
                sql.Identifier(outbox.schema, "event_outbox_migration")
            ),
            (latest_version() + 1,),
        )
    result = await outbox_relay("migrate", env=env_for(outbox))
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"is at version {latest_version() + 1}, newer than this release knows" in result.stderr
    assert result.stdout == ""  # not "schema ... is at version" as if all were well
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("where", ["before", "after"])
async def test_log_options_work_before_and_after_the_command(outbox: Settings, where: str) -> None:
    env = env_for(outbox, OUTBOX_NATS_URL="nats://127.0.0.1:9", OUTBOX_CONNECT_TIMEOUT="1s")
    env.pop("OUTBOX_LOG_FORMAT", None)
    options = ["--log-format", "text", "--log-level", "debug"]
    args = [*options, "run"] if where == "before" else ["run", *options]
    result = await outbox_relay(*args, env=env)
    assert result.returncode == 3, result.stderr
    logged = result.stderr.splitlines()[:-1]  # the last line is the error itself
    assert logged, result.stderr
    assert not any(line.startswith("{") for line in logged), logged  # text, not JSON
    assert any("DEBUG" in line for line in logged), logged


async def test_check_passes_once_the_stream_exists(
    outbox: Settings, nc: NATS, tmp_path: Path
) -> None:
    env = env_for(outbox)
    with relay_process(env, tmp_path / "relay.log") as relay:
        await wait_until(lambda: _stream_exists(nc, outbox), within=30)
        relay.signal(signal.SIGTERM)
        relay.wait(timeout=15)
    result = await outbox_relay("check", env=env)
    assert result.returncode == 0, result.stderr
    assert "postgres: ok" in result.stdout
    assert f"nats: ok, stream {outbox.stream}" in result.stdout


async def _stream_exists(nc: NATS, settings: Settings) -> bool:
    try:
        await nc.jetstream().stream_info(settings.stream)
    except Exception:  # noqa: BLE001
        return False
    return True


async def test_demo_runs_on_embedded_servers_with_nothing_configured() -> None:
    result = await outbox_relay("demo", "--events", "60", env=clean_env(), within=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded PostgreSQL" in result.stdout
    assert "embedded nats-server" in result.stdout
    assert "60 events committed and in stream noetl_events exactly once" in result.stdout


async def test_demo_uses_configured_servers(unmigrated: Settings) -> None:
    result = await outbox_relay("demo", "--events", "20", env=env_for(unmigrated), within=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configured server" in result.stdout
    assert "20 events committed" in result.stdout
    assert (await lag(unmigrated)).pending == 0


async def test_demo_on_a_configured_database_makes_no_event_table_unasked(
    unmigrated: Settings,
) -> None:
    """It used to create the standalone table, which `migrate` refuses to do unasked."""
    env = env_for(unmigrated, OUTBOX_CREATE_EVENT_TABLE="")
    result = await outbox_relay("demo", "--events", "5", env=env, within=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no event table" in result.stderr
    assert "Traceback" not in result.stderr
    with psycopg.connect(unmigrated.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (unmigrated.schema,)
        ).fetchone()
    assert row == (0,)  # nothing created


async def test_dead_letters_can_be_listed_retried_and_purged(
    outbox: Settings, tmp_path: Path
) -> None:
    producer = Producer(schema=outbox.schema, subject_prefix=outbox.subject_prefix)
    with psycopg.connect(outbox.database_url) as conn:
        producer.enqueue(conn, subject="nobody.listens", payload=b"x", msg_id="poison")
    env = env_for(outbox, OUTBOX_MAX_ATTEMPTS="1")
    with relay_process(env, tmp_path / "relay.log") as relay:
        await wait_until(lambda: _dead_letters_are(outbox, 1), within=30)
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0

    listed = await outbox_relay("dead-letters", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (row,) = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert (row["event_id"], row["subject"], row["attempts"]) == ("poison", "nobody.listens", 1)
    assert row["reason"] == "no stream binds subject nobody.listens"

    shown = await outbox_relay("dead-letters", "show", str(row["id"]), env=env)
    assert shown.returncode == 0, shown.stderr
    whole = orjson.loads(shown.stdout)
    assert (whole["payload_text"], whole["reason"]) == ("x", row["reason"])
    missing = await outbox_relay("dead-letters", "show", str(row["id"] + 1000), env=env)
    assert missing.returncode == 2
    assert "dead-letters list" in missing.stderr

    refused = await outbox_relay("dead-letters", "purge", env=env)
    assert refused.returncode == 2
    assert "--all" in refused.stderr
    outside = await outbox_relay(
        "dead-letters", "purge", "--from-id", str(row["id"] + 1), "--json", env=env
    )
    assert orjson.loads(outside.stdout) == {"purge": 0}

    none = await outbox_relay("dead-letters", "retry", "--reason", "no such reason", env=env)
    assert none.stdout.strip() == "retry: 0 dead letters"
    retried = await outbox_relay(
        "dead-letters", "retry", "--from-id", str(row["id"]), "--to-id", str(row["id"]), env=env
    )
    assert retried.stdout.strip() == "retry: 1 dead letters"
    assert (await lag(outbox)).as_dict() | {"oldest_age_seconds": 0} == {
        "pending": 1,
        "oldest_age_seconds": 0,
        "dead_letters": 0,
        "held": 0,
    }
    with relay_process(env, tmp_path / "again.log") as relay:
        await wait_until(lambda: _dead_letters_are(outbox, 1), within=30)
        relay.signal(signal.SIGTERM)
        relay.wait(timeout=15)
    purged = await outbox_relay("dead-letters", "purge", "--all", env=env)
    assert purged.stdout.strip() == "purge: 1 dead letters"
    assert (await lag(outbox)).dead_letters == 0


async def _dead_letters_are(settings: Settings, count: int) -> bool:
    return (await lag(settings)).dead_letters == count


async def test_verify_exits_zero_when_clean_and_five_when_something_is_lost(
    outbox: Settings, tmp_path: Path
) -> None:
    env = env_for(outbox)
    ids = sorted(int(i) for i in emit_events(outbox, 20))
    with relay_process(env, tmp_path / "relay.log") as relay:
        await wait_until(lambda: drained(outbox), within=30)
        relay.signal(signal.SIGTERM)
        relay.wait(timeout=15)
    clean = await outbox_relay("verify", "--json", env=env)
    assert clean.returncode == 0, clean.stderr
    assert orjson.loads(clean.stdout)["ok"] == 20
    window = await outbox_relay("verify", "--from-id", str(ids[5]), "--to-id", str(ids[9]), env=env)
    assert window.stdout.splitlines()[0].split() == ["ok", "5"]
    recent = await outbox_relay("verify", "--since", "10m", "--json", env=env)
    assert orjson.loads(recent.stdout)["ok"] == 20

    # A committed event whose outbox row vanished without a publish: lost.
    with psycopg.connect(outbox.database_url) as conn:
        Producer(schema=outbox.schema, subject_prefix=outbox.subject_prefix).emit_event(
            conn, event_type="step.exit", execution_id=9
        )
        conn.execute(sql.SQL("DELETE FROM {}.event_outbox").format(sql.Identifier(outbox.schema)))
    lost = await outbox_relay("verify", "--json", env=env)
    assert lost.returncode == 5
    assert orjson.loads(lost.stdout)["lost"] == 1
    assert "1 lost, 0 duplicate, 0 unexpected" in lost.stderr


async def test_lag_thresholds_make_it_a_probe(outbox: Settings) -> None:
    env = env_for(outbox)
    emit_events(outbox, 3)
    await anyio.sleep(1.1)
    calm = await outbox_relay("lag", "--max-pending", "3", "--max-age", "1h", env=env)
    assert calm.returncode == 0, calm.stderr
    behind = await outbox_relay("lag", "--max-pending", "2", "--max-age", "1s", env=env)
    assert behind.returncode == 5
    assert "3 rows pending, over --max-pending 2" in behind.stderr
    assert "s old, over --max-age 1s" in behind.stderr
    assert "over limit: 3 rows pending" in behind.stdout


async def test_lag_watch_refreshes_until_interrupted(outbox: Settings) -> None:
    process = await anyio.open_process(
        [sys.executable, "-m", "outbox_relay", "lag", "--watch", "--json", "--interval", "0.2s"],
        env=env_for(outbox),
    )
    async with process:
        assert process.stdout is not None
        output = b""
        # Interrupted once it has refreshed (a loaded machine may take seconds to
        # start it; Ctrl-C before that is Python's, not ours).
        with anyio.fail_after(30):
            while output.count(b"\n") < 2:
                output += await process.stdout.receive()
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await process.wait() == 0
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                output += await process.stdout.receive()
    reports = [orjson.loads(line) for line in output.decode().splitlines()]
    assert len(reports) >= 2
    assert all(r["pending"] == 0 for r in reports)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_run_logs_json_lines_and_serves_metrics_without_secrets(
    outbox: Settings, tmp_path: Path
) -> None:
    port = _free_port()
    database_url = outbox.database_url
    if database_url.startswith("postgresql://") and ":" not in database_url.split("@")[0][13:]:
        # Trust authentication ignores it; the point is that no log line shows it.
        database_url = database_url.replace("@", ":pg-s3cret-91@", 1)
    env = env_for(
        outbox,
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_METRICS_PORT=str(port),
        OUTBOX_METRICS_HOST="127.0.0.1",
        OUTBOX_LOG_LEVEL="debug",
        OUTBOX_NATS_URL=outbox.nats_urls[0],
    )
    with relay_process(env, tmp_path / "relay.log") as relay:
        with psycopg.connect(outbox.database_url) as conn:
            Producer(schema=outbox.schema, subject_prefix=outbox.subject_prefix).emit_event(
                conn, event_type="test.secret", execution_id=1, node_name="payload-marker-5521"
            )
        await wait_until(lambda: drained(outbox), within=30)
        base = f"http://127.0.0.1:{port}"
        await wait_until(lambda: _ready(base), within=15)
        metrics = await anyio.to_thread.run_sync(_get, f"{base}/metrics")
        assert 'outbox_relay_events_total{outcome="ok"} 1.0' in metrics
        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    lines = relay.output().splitlines()
    records = [orjson.loads(line) for line in lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    batch = next(r for r in records if "claimed" in r)
    assert batch["relay_id"].endswith(str(relay.process.pid))
    assert batch["batch"] >= 1
    assert batch["published"] == 1
    assert "pg-s3cret-91" not in relay.output()
    assert "payload-marker-5521" not in relay.output()


async def _ready(base: str) -> bool:
    try:
        await anyio.to_thread.run_sync(_get, f"{base}/readyz")
    except OSError:
        return False
    return True


async def test_replay_needs_a_selection_and_can_count_first(outbox: Settings) -> None:
    emit_events(outbox, 3, execution_id=7)
    env = env_for(outbox)
    unbounded = await outbox_relay("replay", env=env)
    assert unbounded.returncode == 2
    assert "--all" in unbounded.stderr
    counted = await outbox_relay("replay", "--execution-id", "7", "--dry-run", "--json", env=env)
    assert orjson.loads(counted.stdout) == {"would_replay": 3}
    both = await outbox_relay("replay", "--from-id", "1", "--since", "1h", env=env)
    assert both.returncode == 2
    replayed = await outbox_relay("replay", "--execution-id", "7", env=env)
    assert replayed.stdout.strip() == "replayed 3 events"
    assert (await lag(outbox)).pending == 6
