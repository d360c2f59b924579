"""Snowflake event ids in NoETL's layout.

NoETL: ``((ms since 2024-01-01T00:00:00Z) << 23) | (shard_id << 18) | sequence``:
41 bits of time, then 23 bits that make ids minted in the same millisecond unique.
Ids grow with wall-clock time, so NoETL's id-range partitions line up with time.

Two generators with the same shard id mint the same ids in the same millisecond,
and JetStream would then drop the second event as a duplicate of the first. So:

* with ``OUTBOX_SHARD_ID`` set (0-31, one per producer process, as NoETL assigns
  its servers), ids use exactly NoETL's split;
* otherwise each process leases an instance number (0-2047) from a database
  sequence on first use and ids split the low 23 bits as 11 instance bits and a
  12-bit sequence (4096 ids per millisecond per process). Time bits are unchanged,
  so the ids still sort and partition by time like NoETL's.

NoETL's own ``noetl.snowflake_id()`` always mints with shard 1 and a sequence below
1024. Its ids are kept out of reach: shard 1 is refused, and the 64 leased instance
numbers whose top five bits read as shard 1 are never handed out.
"""

from __future__ import annotations

import os
import threading
import time

from outbox_relay.errors import ConfigError

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
LOW_BITS = 23
SHARD_BITS = 5
MAX_SHARD_ID = (1 << SHARD_BITS) - 1
LEASED_INSTANCE_BITS = 11
NOETL_SHARD_ID = 1  # hard-coded in noetl.snowflake_id()
# Leased numbers sharing their top SHARD_BITS with NoETL's shard: 64 of the 2048.
_NOETL_LEASED = range(
    NOETL_SHARD_ID << (LEASED_INSTANCE_BITS - SHARD_BITS),
    (NOETL_SHARD_ID + 1) << (LEASED_INSTANCE_BITS - SHARD_BITS),
)
LEASED_INSTANCES = (1 << LEASED_INSTANCE_BITS) - len(_NOETL_LEASED)


class SnowflakeGenerator:
    """Thread-safe, increasing ids for one instance (a shard, or a leased number)."""

    def __init__(self, instance_id: int = 0, *, instance_bits: int = SHARD_BITS) -> None:
        if not 0 <= instance_id < (1 << instance_bits):
            raise ConfigError(
                f"shard id must be between 0 and {(1 << instance_bits) - 1}, got {instance_id}"
            )
        self.instance_id = instance_id
        self.instance_bits = instance_bits
        self._sequence_bits = LOW_BITS - instance_bits
        self._sequence_mask = (1 << self._sequence_bits) - 1
        self._instance_bits = instance_id << self._sequence_bits
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequence = 0

    def next_id(self) -> int:
        with self._lock:
            # If the clock stepped back, keep counting on the last millisecond so ids
            # stay unique and increasing.
            now_ms = max(_now_ms(), self._last_ms)
            if now_ms == self._last_ms:
                self._sequence = (self._sequence + 1) & self._sequence_mask
                if self._sequence == 0:
                    now_ms = _wait_past(self._last_ms)
            else:
                self._sequence = 0
            self._last_ms = now_ms
            return ((now_ms - EPOCH_MS) << LOW_BITS) | self._instance_bits | self._sequence


def split_id(snowflake: int, *, instance_bits: int = SHARD_BITS) -> tuple[int, int, int]:
    """``(unix_ms, instance, sequence)`` of an id."""
    sequence_bits = LOW_BITS - instance_bits
    return (
        (snowflake >> LOW_BITS) + EPOCH_MS,
        (snowflake >> sequence_bits) & ((1 << instance_bits) - 1),
        snowflake & ((1 << sequence_bits) - 1),
    )


def leased_instance(lease: int) -> int:
    """The instance number of the ``lease``-th lease (0 to LEASED_INSTANCES - 1),
    skipping the numbers whose ids could equal NoETL's."""
    return lease + len(_NOETL_LEASED) if lease >= _NOETL_LEASED.start else lease


def refuse_noetls_shard(generator: SnowflakeGenerator) -> None:
    """Raise :class:`ConfigError` if ``generator`` can mint ids noetl.snowflake_id() mints."""
    top = generator.instance_id >> (generator.instance_bits - SHARD_BITS)
    if top == NOETL_SHARD_ID:
        raise ConfigError(
            f"shard id {NOETL_SHARD_ID} is the one noetl.snowflake_id() mints with: "
            "choose another OUTBOX_SHARD_ID"
        )


def shard_id_from_env() -> int | None:
    raw = os.environ.get("OUTBOX_SHARD_ID", "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"OUTBOX_SHARD_ID must be an integer, got {raw!r}") from None


def _wait_past(last_ms: int) -> int:
    now_ms = _now_ms()
    while now_ms <= last_ms:
        time.sleep(0.0001)
        now_ms = _now_ms()
    return now_ms


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
