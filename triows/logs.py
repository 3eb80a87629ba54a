"""Structured logs: one JSON line per event, each carrying the instance id."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

logger = logging.getLogger("triows")
LIBRARY_LOGGERS = ("aiormq", "trio_asyncio", "proton")


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


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event, e.g. ``log_event("connect", user="Bob")``."""
    logger.log(level, event, extra={"fields": fields})
