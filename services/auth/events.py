"""auth's events.

Published on ``auth.events``, always through the outbox in the transaction of the change they
describe, keyed by the account id: ``account.created``, ``password.reset_requested`` (the reset
token sealed for notification), ``password.changed``, ``account.reset_required``,
``two_factor.enabled``, ``two_factor.disabled``, ``two_factor.recovery_code_used``; the breach
command's batch forms ``accounts.reset_required`` and ``passwords.changed`` (keyed by the incident
id, ``breach.py``).

Consumed: ``sessions.revoked``, only through the holder kit (holder ``auth``), which keeps this
service's token cache honest; auth keeps no state a revocation must change, so it has no handler
of its own.
"""

from __future__ import annotations

import asyncpg

from shared import outbox
from shared.events import Envelope, Event, envelope

PRODUCER = "auth"


async def publish(conn: asyncpg.Connection, topic: str, event: Event, *, key: str) -> Envelope:
    """Write ``event`` to the outbox in ``conn``'s transaction; it is published once that commits."""
    env = envelope(event, producer=PRODUCER, key=key)
    await outbox.add(conn, topic, env)
    return env
