"""Run ``outbox-relay`` as a user would: a separate process, configured by environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson

from outbox_relay.config import Settings

HERE = Path(__file__).parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any OUTBOX_* or PG* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PG"))}
    return {**env, **extra}


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that configures ``outbox-relay`` exactly as ``settings``."""
    configured = {
        "OUTBOX_DATABASE_URL": settings.database_url,
        "OUTBOX_NATS_URL": ",".join(settings.nats_urls),
        "OUTBOX_SCHEMA": settings.schema,
        # A standalone event table for the tests' own schemas (README: Using it from NoETL).
        "OUTBOX_CREATE_EVENT_TABLE": "1",
        "OUTBOX_STREAM": settings.stream,
        "OUTBOX_SUBJECT_PREFIX": settings.subject_prefix,
        "OUTBOX_POLL_INTERVAL": f"{settings.poll_interval}s",
        "OUTBOX_PUBLISH_TIMEOUT": f"{settings.publish_timeout}s",
        "OUTBOX_RETRY_BACKOFF": f"{settings.retry_backoff}s",
        "OUTBOX_RETRY_BACKOFF_MAX": f"{settings.retry_backoff_max}s",
        "OUTBOX_CONNECT_TIMEOUT": f"{settings.connect_timeout}s",
        "OUTBOX_BATCH_SIZE": str(settings.batch_size),
        "OUTBOX_MAX_ATTEMPTS": str(settings.max_attempts),
        "OUTBOX_METRICS_PORT": str(settings.metrics_port),
        "OUTBOX_LAG_INTERVAL": f"{settings.lag_interval}s",
        "OUTBOX_ORDERING": "true" if settings.ordered else "false",
        "OUTBOX_DEAD_LETTER_POLICY": settings.dead_letter_policy,
        "OUTBOX_STANDBY_CONFIRMED": "true" if settings.standby_confirmed else "false",
    }
    return clean_env(**{**configured, **extra})


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def outbox_relay(*args: str, env: dict[str, str], within: float = 60) -> Result:
    with anyio.fail_after(within):
        done = await anyio.run_process(
            [sys.executable, "-m", "outbox_relay", *args], env=env, check=False
        )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


class RelayProcess:
    """``outbox-relay run`` in the background, its log in a file (a pipe could fill up)."""

    def __init__(
        self, env: dict[str, str], log: Path, *args: str, wrapper: Sequence[str] = ()
    ) -> None:
        self.log = log
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                # wrapper: a prefix such as ``ip netns exec <name>`` (it execs the relay).
                [*wrapper, sys.executable, "-m", "outbox_relay", "run", *args],
                env=env,
                stdout=sink,
                stderr=sink,
            )

    def output(self) -> str:
        return self.log.read_text()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)


@contextmanager
def relay_process(
    env: dict[str, str], log: Path, *args: str, wrapper: Sequence[str] = ()
) -> Iterator[RelayProcess]:
    """Killed if the test leaves it running."""
    relay = RelayProcess(env, log, *args, wrapper=wrapper)
    try:
        yield relay
    finally:
        if relay.process.poll() is None:
            relay.signal(signal.SIGKILL)
        relay.process.wait()


async def produce(settings: Settings, execution_id: int, count: int) -> list[int]:
    """Emit ``count`` events from a producer process of its own; return their ids."""
    done = await anyio.run_process(
        [
            sys.executable,
            str(HERE / "produce.py"),
            settings.database_url,
            settings.schema,
            settings.subject_prefix,
            str(execution_id),
            str(count),
        ],
    )
    ids: list[int] = orjson.loads(done.stdout)
    return ids
