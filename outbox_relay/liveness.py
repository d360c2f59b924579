"""A relay that cannot publish steps down, so that the others deliver its keys."""

from __future__ import annotations

import contextlib
import logging
import math
import time

import anyio
import psycopg

from outbox_relay.errors import ServerUnavailableError
from outbox_relay.outages import STATEMENT_TIMEOUT
from outbox_relay.publish import Publisher
from outbox_relay.sessions import Sessions

log = logging.getLogger(__name__)

# A relay that has not been able to publish for this long gives its key partitions
# back, so that the other relays deliver its keys (README: Guarantees).
STEP_DOWN_AFTER = 2.0
# How often a relay that stepped down checks whether it can publish again.
_REJOIN_CHECK = 1.0


class Liveness:
    """Tracks since when publishing fails; steps down and rejoins (ordered mode)."""

    def __init__(self, sessions: Sessions, *, ordered: bool) -> None:
        self._sessions = sessions
        self._ordered = ordered
        # Since when publishing has failed (None: it works), and whether this relay
        # has given its partitions back because of it.
        self._unpublishable_since: float | None = None
        self.stepped_down = False
        self._next_rejoin_check = 0.0

    def publishing_works(self) -> None:
        self._unpublishable_since = None

    async def unpublishable(self, since: float) -> float:
        """Publishing has failed since ``since``: past STEP_DOWN_AFTER, give the key
        partitions back. Returns how soon to look again to step down on time."""
        now = time.monotonic()
        if self._unpublishable_since is None:
            self._unpublishable_since = since
        if not self._ordered:
            return math.inf
        if self.stepped_down:
            return _REJOIN_CHECK  # to rejoin soon after publishing works again
        if (wait := self._unpublishable_since + STEP_DOWN_AFTER - now) > 0:
            return wait
        partitions = self._sessions.partitions
        with contextlib.suppress(psycopg.Error, TimeoutError, ServerUnavailableError):
            # On failure the session is gone, and its locks with it.
            with anyio.fail_after(STATEMENT_TIMEOUT):
                await partitions.leave(self._sessions.first())
        partitions.forget()
        self.stepped_down = True
        log.warning(
            "cannot publish for %.0fs: gave the key partitions back to the other relays",
            now - self._unpublishable_since,
        )
        return _REJOIN_CHECK

    async def rejoin_when_publishable(self, publisher: Publisher) -> None:
        """Take a share of the partitions again once the stream answers."""
        now = time.monotonic()
        if now < self._next_rejoin_check:
            return
        self._next_rejoin_check = now + _REJOIN_CHECK
        if not await publisher.stream_exists():
            return
        self.stepped_down = False
        self._unpublishable_since = None
        await self._sessions.partitions.join(self._sessions.first())
        log.info("publishing again: rejoined the relays")
