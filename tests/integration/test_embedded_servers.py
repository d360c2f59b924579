"""The throw-away servers the tests and `outbox-relay demo` start."""

from __future__ import annotations

import socket
from pathlib import Path

from outbox_relay.embedded import EmbeddedNats, nats_server_binary


def test_nats_is_found_though_its_ports_file_is_read_before_it_is_written(
    tmp_path: Path,
) -> None:
    """nats-server creates its ports file, then writes it: a start that reads it in
    between must look again, not fail (and leave the server running behind it)."""
    slow_writer = tmp_path / "nats-server"
    slow_writer.write_text(
        "#!/bin/sh\n"
        "# The ports file as nats-server names it, empty for a while first.\n"
        'for arg in "$@"; do [ "$previous" = --ports_file_dir ] && dir="$arg";'
        ' previous="$arg"; done\n'
        ': > "$dir/nats-server_$$.ports"\n'
        "sleep 0.5\n"
        f'exec {nats_server_binary()} "$@"\n'
    )
    slow_writer.chmod(0o755)
    with (
        EmbeddedNats(binary=slow_writer) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn,
    ):
        assert conn.recv(4).startswith(b"INFO")
