"""Crash points for fault-injection tests, armed by ``OUTBOX_FAILPOINT=<name>``.

An armed point kills the process with SIGKILL when reached: no cleanup, no
commit, exactly what a power cut or OOM kill leaves behind. Unarmed, a point
costs one string comparison per batch.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

AFTER_CLAIM = "after_claim"  # rows locked, nothing sent
AFTER_PUBLISH = "after_publish"  # messages sent, PubAcks not awaited
AFTER_ACK = "after_ack"  # PubAcks in, the delete not committed
POINTS = (AFTER_CLAIM, AFTER_PUBLISH, AFTER_ACK)

_armed = os.environ.get("OUTBOX_FAILPOINT", "")


def armed(name: str) -> bool:
    return name == _armed


def failpoint(name: str) -> None:
    if name == _armed:
        log.critical("failpoint %s reached: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)
