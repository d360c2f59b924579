"""A network namespace of the test's own, linked to the host by a veth pair, whose
traffic nftables can cut, thin out or (with tests/proxy.py) slow down.

Nothing leaves the machine: the namespace reaches only the host end of its own veth
pair, where the tests' proxies listen and forward to loopback.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from types import TracebackType
from typing import Self


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y nftables iproute2)"
    return None


def _run(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, input=stdin, text=True, check=True, capture_output=True, timeout=30)


class Namespace:
    """``ip netns`` with one veth pair: the host end is :attr:`host_ip`."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"outbox-{tag}"
        self._host_link, self._ns_link = f"vh{tag}", f"vn{tag}"
        subnet = random.randrange(1, 255)  # an address, not a secret
        self.host_ip, self._ns_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    @property
    def run_in(self) -> tuple[str, ...]:
        """The command prefix that runs a program inside."""
        return ("ip", "netns", "exec", self.name)

    def __enter__(self) -> Self:
        _run("ip", "netns", "add", self.name)
        try:
            _run(
                "ip", "link", "add", self._host_link, "type", "veth", "peer", "name", self._ns_link
            )
            _run("ip", "link", "set", self._ns_link, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self._host_link)
            _run("ip", "link", "set", self._host_link, "up")
            inside = self.run_in
            _run(*inside, "ip", "addr", "add", f"{self._ns_ip}/30", "dev", self._ns_link)
            _run(*inside, "ip", "link", "set", self._ns_link, "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
        except BaseException:
            self._remove()
            raise
        return self

    def cut(self, *ports: int) -> None:
        """Drop every packet to and from the ports: no RST, the connections just go quiet."""
        self._rules(*ports, verdict="drop")

    def lose(self, percent: int, *ports: int) -> None:
        """Drop that share of the ports' packets, at random."""
        self._rules(*ports, verdict=f"numgen random mod 100 < {percent} drop")

    def heal(self) -> None:
        _run(*self.run_in, "nft", "delete", "table", "inet", "fault")

    def _rules(self, *ports: int, verdict: str) -> None:
        listed = ", ".join(map(str, ports))
        _run(
            *self.run_in,
            "nft",
            "-f",
            "-",
            stdin=f"""
table inet fault {{
    chain out {{ type filter hook output priority 0; tcp dport {{ {listed} }} {verdict}; }}
    chain in {{ type filter hook input priority 0; tcp sport {{ {listed} }} {verdict}; }}
}}
""",
        )

    def _remove(self) -> None:
        # Deleting the namespace deletes the veth pair with it.
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self._host_link], check=False, capture_output=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()
