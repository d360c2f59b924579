"""What the relay waits out rather than reports: backoff, and lost connections."""

from __future__ import annotations

import random
from typing import Any

import psycopg

from outbox_relay.errors import ServerUnavailableError

# Longest any of the relay's statements may take (a dead TCP peer answers none).
STATEMENT_TIMEOUT = 30.0


class Backoff:
    """Exponential backoff with full jitter, for outages."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * 2.0 ** min(self._attempt, 30))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


def connection_lost(exc: BaseException, conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an error means "reconnect and carry on" rather than a bug to report.

    A session ended by the server (idle-in-transaction timeout, admin shutdown,
    restart) surfaces as several error classes; what they share is a dead connection.
    """
    if isinstance(exc, TimeoutError | ServerUnavailableError | psycopg.OperationalError):
        return True
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return True  # the server became a standby (or we reached one): find the primary
    return bool(conn.closed or conn.broken)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
