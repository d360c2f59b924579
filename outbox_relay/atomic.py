"""JetStream atomic batch publish (ADR-50): the rules the relay's fast path follows.

A batch is a run of core-NATS publishes carrying ``Nats-Batch-Id`` and a gapless
``Nats-Batch-Sequence``; the last also carries ``Nats-Batch-Commit: 1`` and a reply
subject. The server stores the whole batch, in order, and answers with one PubAck
(its ``count`` is the batch's size), or stores none of it and answers with an error.
Pure rules here; :mod:`~outbox_relay.publish_atomic` does the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from outbox_relay.headers import wire_size

BATCH_ID_HEADER = "Nats-Batch-Id"
BATCH_SEQUENCE_HEADER = "Nats-Batch-Sequence"
BATCH_COMMIT_HEADER = "Nats-Batch-Commit"
# The server's limit per batch (it refuses longer ones with err_code 10199).
MAX_BATCH_MESSAGES = 1000
# 2.12.0 refuses a batch that carries Nats-Msg-Id (err_code 10177); 2.12.1 dedups it.
SUPPORTED_SINCE = (2, 12, 1)
# Answers that mean batches cannot work here (the stream does not allow them, or the
# server refuses our msg ids in them): the relay stops trying and publishes one by one.
BATCHING_REFUSED = frozenset({10174, 10177})
# The widest batch headers the relay adds: a 32-character id and a 4-digit sequence.
BATCH_HEADER_BYTES = wire_size(
    {BATCH_ID_HEADER: "0" * 32, BATCH_SEQUENCE_HEADER: "1000", BATCH_COMMIT_HEADER: "1"}, 0
) - wire_size({}, 0)

T = TypeVar("T")


def server_supports(version: tuple[int, int, int]) -> bool:
    """Whether a nats-server of ``version`` can publish the relay's batches."""
    return version >= SUPPORTED_SINCE


def split(items: Sequence[T], size: int = MAX_BATCH_MESSAGES) -> list[Sequence[T]]:
    """``items`` in order, in runs of at most ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def batch_headers(
    headers: dict[str, str], batch_id: str, sequence: int, *, commit: bool
) -> dict[str, str]:
    """``headers`` plus the batch's own, for the ``sequence``-th message (from 1)."""
    added = {**headers, BATCH_ID_HEADER: batch_id, BATCH_SEQUENCE_HEADER: str(sequence)}
    if commit:
        added[BATCH_COMMIT_HEADER] = "1"
    return added
