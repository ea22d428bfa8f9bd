"""JSON logs with request and event ids.

Ids travel in context variables, so every line logged while handling a request or an event carries
them without passing them around. Nothing secret is ever put in a log record: callers log ids, not
tokens, and :class:`RedactFilter` masks anything that looks like a bearer secret as a last line of
defence.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)

_SECRETISH = re.compile(r"(?i)(token|password|secret|authorization)([\"'=: ]+)([^\s\"'&,]{6,})")


class ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        rid = request_id.get()
        if rid:
            record.request_id = rid
        eid = event_id.get()
        if eid:
            record.event_id = eid
        return True


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if isinstance(record.msg, str):
            record.msg = _SECRETISH.sub(r"\1\2[redacted]", record.msg)
        return True


class CoordinatorWaitFilter(logging.Filter):
    """aiokafka logs ERROR while the broker's group coordinator is still loading (at every start,
    and after a broker failover) although it retries by itself, and readiness already reports a
    consumer that has no partitions yet. Those messages become one INFO line, "waiting for Kafka's
    group coordinator", at most every ``every`` seconds; their text stays at DEBUG. Anything else
    aiokafka reports is left as it is."""

    LOGGER = "aiokafka.consumer.group_coordinator"
    RETRIABLE = ("GroupCoordinatorNotAvailable", "CoordinatorNotAvailable", "CoordinatorLoadInProgress",
                 "NotCoordinator", "marking coordinator dead", "Marking the coordinator dead")

    def __init__(self, every: float = 30.0) -> None:
        super().__init__()
        self.every = every
        self._last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self.LOGGER or record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        if not any(marker in text for marker in self.RETRIABLE):
            return True
        import time

        now = time.monotonic()
        record.detail = text
        if now - self._last >= self.every:
            self._last = now
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "waiting for Kafka's group coordinator", None
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def setup(service: str, level: str = "INFO") -> None:
    """Configure the root logger to write one JSON object per line on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    handler.addFilter(ContextFilter(service))
    handler.addFilter(CoordinatorWaitFilter())
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "aiohttp.access", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
