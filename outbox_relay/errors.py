"""Errors that carry an actionable, one-line message for the person who caused them."""

from __future__ import annotations


class OutboxError(Exception):
    """Base class. The CLI prints ``str(error)`` and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(OutboxError, ValueError):
    """A setting is missing or out of range."""

    exit_code = 2


class InvalidSubjectError(OutboxError, ValueError):
    """A subject NATS would refuse or treat as a wildcard."""

    exit_code = 2


class PayloadTooLargeError(OutboxError, ValueError):
    """A payload over the configured maximum, refused before commit."""

    exit_code = 2


class ServerUnavailableError(OutboxError):
    """PostgreSQL or NATS did not answer at start-up."""

    exit_code = 3


class CredentialsRefusedError(ServerUnavailableError):
    """The server answered and refused the credentials: a setting to fix, at once."""

    exit_code = 2


class ReadOnlyServerError(ServerUnavailableError):
    """PostgreSQL answers but takes no writes: a standby, or a read-only session."""


class NotMigratedError(OutboxError):
    """The database lacks the outbox schema, or has an older or newer version of it."""

    exit_code = 4


class InvalidHeadersError(OutboxError, ValueError):
    """Message headers NATS would refuse, or that the relay sets itself."""

    exit_code = 2


class InvalidValueError(OutboxError, ValueError):
    """A value the database would refuse or store changed (NaN in jsonb, out of range)."""

    exit_code = 2
