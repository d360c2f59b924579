"""outbox-relay: a transactional-outbox relay from PostgreSQL to NATS JetStream.

Producers write through :func:`emit_event` / :func:`enqueue` (or their async twins)
inside their own transaction; ``outbox-relay run`` publishes what committed.
"""

from outbox_relay.config import Settings
from outbox_relay.errors import (
    ConfigError,
    InvalidHeadersError,
    InvalidSubjectError,
    NotMigratedError,
    OutboxError,
    PayloadTooLargeError,
    ServerUnavailableError,
)
from outbox_relay.ids import SnowflakeGenerator
from outbox_relay.producer import (
    Producer,
    emit_event,
    emit_event_async,
    enqueue,
    enqueue_async,
)
from outbox_relay.relay import Relay

__all__ = [
    "ConfigError",
    "InvalidHeadersError",
    "InvalidSubjectError",
    "NotMigratedError",
    "OutboxError",
    "PayloadTooLargeError",
    "Producer",
    "Relay",
    "ServerUnavailableError",
    "Settings",
    "SnowflakeGenerator",
    "emit_event",
    "emit_event_async",
    "enqueue",
    "enqueue_async",
]
