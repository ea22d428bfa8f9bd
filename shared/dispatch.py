"""Typed event dispatch through the registry: one handler per event type, per consumer.

A consumer declares what it does with each type it reads::

    HANDLERS = EventHandlers("devicesession.revoker", {
        PasswordChanged: on_password_changed,          # async (conn, event, envelope) -> None
        PasswordsChanged: on_passwords_changed,
    }, ignored=[AccountCreated, PasswordResetRequested])

The envelope's ``type`` picks the dataclass from :data:`shared.events.REGISTRY`, the payload is
decoded into it (times and UUIDs stay strings on the wire and are typed by the dataclass's own
fields), and its handler runs. A type the consumer declared ``ignored`` is skipped quietly. Any other
type (one added later and not yet handled, or one nobody registered) is logged once per type and
counted in ``hearth_events_unknown_total``: it is never skipped silently. Adding an event is then two
steps: the dataclass (``@register``) and a handler where it is consumed; ``tests/unit`` checks that
every registered type is handled or knowingly ignored somewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import Counter

from shared.events import REGISTRY, Envelope, Event, decode_data

log = logging.getLogger(__name__)

UNKNOWN = Counter("hearth_events_unknown_total", "Events of a type their consumer does not know", ["consumer", "type"])
IGNORED = Counter("hearth_events_ignored_total", "Events of a type their consumer knowingly ignores",
                  ["consumer", "type"])

Handler = Callable[[Any, Any, Envelope], Awaitable[None]]

#: Every EventHandlers built, by consumer name (what the registry test reads).
DECLARED: dict[str, EventHandlers] = {}


class EventHandlers:
    """Handlers per event type for one consumer; call it with ``(conn, envelope)``."""

    def __init__(self, consumer: str, handlers: Mapping[type[Event], Handler],
                 ignored: Iterable[type[Event]] = ()) -> None:
        self.consumer = consumer
        self.handlers: dict[str, tuple[type[Event], Handler]] = {}
        for cls, fn in handlers.items():
            if REGISTRY.get(cls.TYPE) is not cls:
                raise ValueError(f"{cls.__name__} is not registered (use @register)")
            self.handlers[cls.TYPE] = (cls, fn)
        self.ignored = frozenset(cls.TYPE for cls in ignored)
        if self.ignored & set(self.handlers):
            raise ValueError("a type cannot be both handled and ignored")
        self._warned: set[str] = set()
        DECLARED[consumer] = self

    @property
    def types(self) -> frozenset[str]:
        """The types this consumer handles."""
        return frozenset(self.handlers)

    def knows(self, event_type: str) -> bool:
        return event_type in self.handlers or event_type in self.ignored

    async def __call__(self, conn: Any, env: Envelope) -> None:
        entry = self.handlers.get(env.type)
        if entry is not None:
            cls, fn = entry
            await fn(conn, decode_data(env, cls), env)
            return
        kind = env.type[:80]
        if env.type in self.ignored:
            IGNORED.labels(self.consumer, kind).inc()
            return
        UNKNOWN.labels(self.consumer, kind).inc()
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("event of an unknown type skipped", extra={"consumer": self.consumer, "type": kind,
                                                                   "event": str(env.id)})
