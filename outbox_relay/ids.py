"""Snowflake event ids in NoETL's layout.

``((ms since 2024-01-01T00:00:00Z) << 23) | (shard_id << 18) | sequence``: 41 bits of
time, 5 bits of shard, 18 bits of sequence per millisecond. Ids grow with wall-clock
time, so NoETL's id-range partitions line up with time windows.

Two processes with the same shard id can mint the same id in the same millisecond, so
concurrent producer processes must each have their own shard id (``OUTBOX_SHARD_ID``),
as NoETL's servers do.
"""

from __future__ import annotations

import os
import threading
import time

from outbox_relay.errors import ConfigError

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SHARD_BITS = 5
SEQUENCE_BITS = 18
MAX_SHARD_ID = (1 << SHARD_BITS) - 1
_SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1


class SnowflakeGenerator:
    """Thread-safe, monotonic id source for one shard."""

    def __init__(self, shard_id: int = 0) -> None:
        if not 0 <= shard_id <= MAX_SHARD_ID:
            raise ConfigError(f"shard id must be between 0 and {MAX_SHARD_ID}, got {shard_id}")
        self._shard_bits = shard_id << SEQUENCE_BITS
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequence = 0

    def next_id(self) -> int:
        with self._lock:
            now_ms = _now_ms()
            if now_ms < self._last_ms:
                # The clock stepped back: keep counting on the last millisecond so
                # ids stay unique and increasing.
                now_ms = self._last_ms
            if now_ms == self._last_ms:
                self._sequence = (self._sequence + 1) & _SEQUENCE_MASK
                if self._sequence == 0:
                    now_ms = self._wait_next_ms(self._last_ms)
            else:
                self._sequence = 0
            self._last_ms = now_ms
            return ((now_ms - EPOCH_MS) << (SHARD_BITS + SEQUENCE_BITS)) | self._shard_bits | (
                self._sequence
            )

    @staticmethod
    def _wait_next_ms(last_ms: int) -> int:
        now_ms = _now_ms()
        while now_ms <= last_ms:
            time.sleep(0.0001)
            now_ms = _now_ms()
        return now_ms


def split_id(snowflake: int) -> tuple[int, int, int]:
    """``(unix_ms, shard_id, sequence)`` of an id."""
    return (
        (snowflake >> (SHARD_BITS + SEQUENCE_BITS)) + EPOCH_MS,
        (snowflake >> SEQUENCE_BITS) & MAX_SHARD_ID,
        snowflake & _SEQUENCE_MASK,
    )


def shard_id_from_env() -> int:
    raw = os.environ.get("OUTBOX_SHARD_ID", "0")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"OUTBOX_SHARD_ID must be an integer, got {raw!r}") from None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
