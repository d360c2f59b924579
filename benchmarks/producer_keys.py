"""Producer rate by ordering-key count: what ordered delivery costs the writers.

32 pgbench clients, each transaction an event row and its outbox row through the
enqueue function, keys drawn at random from 1, 10 or 1,000 (one key: every writer on
one execution). A relay drains throughout. Modes, interleaved round by round:

* ``unordered``: rows without a key;
* ``ours``: keyed rows, the shipped design (no producer lock, order by visibility);
* ``commit-lock``: keyed rows plus a deferred trigger that locks the key at commit,
  the least any exact-commit-order scheme must hold (commit-time sequencing);
* ``insert-lock``: keyed rows, the key locked from insert to commit (release 0.1's
  0004 design).

::

    .venv/bin/python -m benchmarks.producer_keys --keys 1 10 1000 --seconds 4 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import ExitStack
from pathlib import Path

import anyio

from benchmarks.common import fresh_outbox, interleaved_medians, servers
from benchmarks.producer_overhead import run_pgbench
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.queries import KEY_LOCK_CLASS, render
from outbox_relay.relay import Relay

CLIENTS = 32
MODES = ("unordered", "ours", "commit-lock", "insert-lock")
SCRIPT = """\\set eid random(1, 9000000000000000)
\\set key random(1, {keys})
BEGIN;
{insert_lock}INSERT INTO {schema}.event (execution_id, event_id, event_type)
    VALUES (:key, :eid, 'bench');
SELECT {schema}.event_outbox_enqueue('{prefix}.bench', '\\x7b7d'::bytea, :eid::text,
    NULL, NULL, {key});
COMMIT;
"""
INSERT_LOCK = "SELECT pg_advisory_xact_lock({key_class}, hashtext(:key::text));\n"
# Fires at commit, once per row: holds the key from then until the commit is done.
COMMIT_LOCK = """
CREATE FUNCTION {schema}.bench_commit_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({key_lock_class}, hashtext(NEW.ordering_key));
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_commit_lock AFTER INSERT ON {outbox_table}
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.bench_commit_lock();
"""


def script(settings: Settings, mode: str, keys: int, folder: Path) -> Path:
    path = folder / f"{mode}-{keys}.sql"
    path.write_text(
        SCRIPT.format(
            keys=keys,
            schema=f'"{settings.schema}"',
            prefix=settings.subject_prefix,
            key="NULL" if mode == "unordered" else ":key::text",
            insert_lock=INSERT_LOCK.format(key_class=KEY_LOCK_CLASS)
            if mode == "insert-lock"
            else "",
        )
    )
    return path


async def commit_lock(settings: Settings, on: bool) -> None:
    async with await connect_postgres(settings, autocommit=True) as conn:
        if on:
            await conn.execute(render(COMMIT_LOCK, settings.names))
        else:
            await conn.execute(
                render(
                    "DROP TRIGGER IF EXISTS bench_commit_lock ON {outbox_table};"
                    "DROP FUNCTION IF EXISTS {schema}.bench_commit_lock();",
                    settings.names,
                )
            )


async def main(keys: list[int], seconds: int, rounds: int) -> dict[str, dict[str, float]]:
    folder = Path(tempfile.mkdtemp())
    with ExitStack() as stack:
        settings = await fresh_outbox(*servers(stack))
        results: dict[str, dict[str, float]] = {}
        relay = Relay(settings, relay_id="bench")
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run)
            await relay.wait_started()
            for count in keys:

                async def measure(mode: str, count: int = count) -> float:
                    await commit_lock(settings, mode == "commit-lock")
                    path = script(settings, mode, count, folder)
                    return await run_pgbench(settings, CLIENTS, seconds, path)

                results[str(count)] = await interleaved_medians(MODES, rounds, measure)
                await commit_lock(settings, False)
            relay.stop()
    print(
        f"producer commits/s, {CLIENTS} clients, event + outbox row per transaction, "
        f"median of {rounds} rounds of {seconds}s; ratios to unordered"
    )
    print(
        f"{'keys':>6}"
        + "".join(f"{m:>13}" for m in MODES)
        + "".join(f"{m + '/u':>15}" for m in MODES[1:])
    )
    for key_count, row in results.items():
        print(
            f"{key_count:>6}"
            + "".join(f"{row[m]:>13.0f}" for m in MODES)
            + "".join(f"{row[m] / row['unordered']:>15.2f}" for m in MODES[1:])
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 10, 1000])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.keys, args.seconds, args.rounds)
