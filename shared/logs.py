"""JSON logs with request, event and trace ids.

Ids travel in context variables, so every line logged while handling a request or an event carries
them without passing them around. The trace id follows one action across services and Kafka (W3C
trace context): a request's ``traceparent`` header, else the edge's request id, else a new one; it
goes on in the ``traceparent`` of internal calls and in the ``trace`` of every event published while
handling the request or an event, and a consumer takes it from the event it handles. So a password
change, its revocation and every holder's acknowledgement log the same ``trace_id``.

Nothing secret is ever put in a log record: callers log ids, not tokens, and :class:`RedactFilter`
masks anything that looks like a bearer secret as a last line of defence.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import secrets
import sys
from collections.abc import Iterator, Mapping

from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)
trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def trace_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` value, or None when it is not one (never the invalid
    all-zero id). Anything else a client sends is ignored, so nothing it writes reaches the logs."""
    if not traceparent or len(traceparent) > 64:
        return None
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


def new_trace_id(request_id: str | None = None) -> str:
    """A request's own trace id when it brought none: the edge's request id when it has the shape
    of one (nginx's ``$request_id`` is 32 hex digits), so the edge's access log line matches."""
    if request_id and _TRACE_ID.match(request_id) and request_id != "0" * 32:
        return request_id
    return secrets.token_hex(16)


def traceparent() -> str | None:
    """The ``traceparent`` to send on (an internal call, an event) for the current trace."""
    tid = trace_id.get()
    return f"00-{tid}-{secrets.token_hex(8)}-01" if tid else None


def trace_context() -> dict[str, str]:
    """The ``trace`` of an event published now: the current trace, if any."""
    value = traceparent()
    return {"traceparent": value} if value else {}


@contextlib.contextmanager
def handling_event(event: str, trace: Mapping[str, str]) -> Iterator[None]:
    """Log lines (and events published) while handling an event carry its id and its trace."""
    eid = event_id.set(event)
    tid = trace_id.set(trace_of(trace.get("traceparent")) or trace_id.get())
    try:
        yield
    finally:
        trace_id.reset(tid)
        event_id.reset(eid)

_SECRETISH = re.compile(r"(?i)(token|password|secret|authorization)([\"'=: ]+)([^\s\"'&,]{6,})")


def redact(text: str) -> str:
    """Mask anything that looks like a bearer secret (``token=...``, ``X-Plex-Token: ...``)."""
    return _SECRETISH.sub(r"\1\2[redacted]", text)


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
        tid = trace_id.get()
        if tid:
            record.trace_id = tid
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
