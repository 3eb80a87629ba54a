"""Structured logs: one JSON line per event, each carrying the instance id."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

logger = logging.getLogger("triows")
LIBRARY_LOGGERS = ("aiormq", "trio_asyncio", "proton")
# trio's accept loop: while accept() fails for want of descriptors or memory
# (EMFILE, ENFILE, ENOBUFS, ENOMEM) it logs a traceback every 0.1 s.
ACCEPT_LOGGER = "trio.serve_listeners"
# At most one accept_failed line per this many seconds; the next says how many it stands for.
ACCEPT_FAILED_LOG_INTERVAL = 10.0


class _JsonLines(logging.Formatter):
    def __init__(self, instance_id: str) -> None:
        super().__init__()
        self._instance_id = instance_id

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "instance": self._instance_id,
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _AcceptFailures(logging.Filter):
    """trio's failed-accept records as one ``accept_failed`` event: no traceback, rate-limited."""

    def __init__(self) -> None:
        super().__init__()
        self._logged_at = -math.inf
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._logged_at < ACCEPT_FAILED_LOG_INTERVAL:
            self._dropped += 1
            return False
        fields = {"reason": record.getMessage(), "dropped_since_last": self._dropped}
        self._logged_at, self._dropped = now, 0
        record.msg, record.args = "accept_failed", None
        record.exc_info, record.exc_text = None, None
        record.__dict__["fields"] = fields
        return True


def configure_logging(instance_id: str, level: str = "INFO") -> None:
    """Send triows' events to stderr as JSON lines tagged with ``instance_id``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines(instance_id))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    # Broker client libraries log tracebacks on every outage; as JSON lines
    # (the traceback in "exception") they stay one line per event. Our own
    # broker_unavailable events already say what happened, so only warnings.
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(max(logging.WARNING, logger.level))
        library.propagate = False
    accept = logging.getLogger(ACCEPT_LOGGER)
    accept.handlers[:] = [handler]
    accept.filters[:] = [_AcceptFailures()]
    accept.propagate = False


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event, e.g. ``log_event("connect", user="Bob")``."""
    logger.log(level, event, extra={"fields": fields})
