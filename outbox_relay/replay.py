"""Re-enqueue committed events from the event table: a backfill, or a lost stream rebuilt.

Replayed rows carry their original event id as msg id and the payload ``emit_event``
would have written, so a replay inside the stream's duplicate window is collapsed by
JetStream and one outside it adds the same message again. Headers the producer gave
(a ``traceparent``, say) are not in the event table and are not replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from outbox_relay.errors import ConfigError
from outbox_relay.queries import Names, ordering_key_of, query
from outbox_relay.verify import Window


@dataclass(frozen=True, slots=True)
class ReplaySelection:
    window: Window = field(default_factory=Window)
    execution_ids: tuple[int, ...] | None = None
    everything: bool = False  # required when nothing else narrows the replay
    # Events created in this span (inclusive, None is open), by their created_at.
    since: datetime | None = None
    until: datetime | None = None

    @property
    def empty(self) -> bool:
        return (
            self.execution_ids is None
            and self.window == Window()
            and self.since is None
            and self.until is None
        )

    def params(self) -> dict[str, Any]:
        ids = list(self.execution_ids) if self.execution_ids is not None else None
        times = {"since": self.since, "until": self.until}
        return {"execution_ids": ids, **self.window.params(), **times}


async def replay(
    conn: psycopg.AsyncConnection[Any],
    names: Names,
    subject_prefix: str,
    selection: ReplaySelection,
    *,
    ordering_key: str | None = "execution_id",
    dry_run: bool = False,
) -> int:
    """Enqueue the selected events again (or only count them); return how many.

    ``ordering_key``: the event column that keys each event, as the producer keyed
    it (None: unkeyed).
    """
    if selection.empty and not selection.everything:
        raise ConfigError(
            "select events with --execution-id, --from-id/--to-id or --since/--until, or pass --all"
        )
    filter_ = query("replay_filter", names)
    if dry_run:
        cur = await conn.execute(query("replay_count", names, filter=filter_), selection.params())
        row = await cur.fetchone()
        return int(row[0]) if row else 0
    try:
        cur = await conn.execute(
            query(
                "replay_events",
                names,
                filter=filter_,
                ordering_key=ordering_key_of("e", ordering_key),
            ),
            {**selection.params(), "subject_prefix": subject_prefix},
        )
    except psycopg.errors.CheckViolation as exc:
        # The outbox's constraints (sql/migrations/0007_row_checks.sql): an event type
        # that makes no valid subject, or one too long for NATS.
        raise ConfigError(
            "an event in the selection cannot be sent to NATS "
            f"({exc.diag.message_primary}: {exc.diag.constraint_name}); narrow the selection"
        ) from None
    return cur.rowcount
