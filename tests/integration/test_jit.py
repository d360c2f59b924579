"""No JIT compilation in the sessions outbox-relay opens, on a server that compiles
(Debian's PostgreSQL ships with JIT on; the embedded wheel has none)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.queries import KEY_PARTITIONS, query
from outbox_relay.schema import latest_version
from outbox_relay.store import ClaimScope
from tests.helpers import producer_for

# The server or the user asks for JIT on every plan, however cheap.
_JIT_EVERYWHERE = (
    "-c jit=on -c jit_above_cost=0 -c jit_inline_above_cost=0 -c jit_optimize_above_cost=0"
)


async def _explained_claim(
    conn: psycopg.AsyncConnection[Any], settings: Settings
) -> dict[str, Any]:
    scope = ClaimScope(ordered=True, partitions=frozenset(range(KEY_PARTITIONS)))
    params = {"limit": 2000, "max_bytes": 2**24, "schema_version": latest_version()}
    explain = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + query("claim_batch", settings.names)
    row = await (await conn.execute(explain, params | scope.params())).fetchone()
    await conn.rollback()
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else orjson.loads(row[0])
    return dict(plan[0])


async def test_no_statement_of_ours_pays_jit_compilation(outbox: Settings) -> None:
    with psycopg.connect(outbox.database_url, autocommit=True) as conn:
        if conn.execute("SELECT pg_jit_available()").fetchone() != (True,):
            pytest.skip("this PostgreSQL cannot compile (no JIT provider): nothing to test")
    producer = producer_for(outbox)
    with psycopg.connect(outbox.database_url) as conn:
        for n in range(200):
            producer.enqueue(
                conn,
                subject=f"{outbox.subject_prefix}.ok",
                payload=b"{}",
                msg_id=f"m{n}",
                ordering_key=f"k{n % 7}",
            )
        conn.commit()
    jit_everywhere = replace(
        outbox, database_url=make_conninfo(outbox.database_url, options=_JIT_EVERYWHERE)
    )
    # A session of the user's own, with those settings, compiles the ordered claim ...
    async with await psycopg.AsyncConnection.connect(jit_everywhere.database_url) as theirs:
        assert "JIT" in await _explained_claim(theirs, outbox)
    # ... but no session outbox-relay opens (relay, CLI) does, whatever they say.
    async with await connect_postgres(jit_everywhere) as ours:
        assert (await (await ours.execute("SHOW jit")).fetchone()) == ("off",)
        assert "JIT" not in await _explained_claim(ours, outbox)
