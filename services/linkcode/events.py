"""linkcode's consumers.

- ``sessions.revoked``, in the replicas' shared group ``linkcode.revocations``: tokens that were
  linked but not yet collected live sealed in the database, so their erasure is applied once per
  revocation (idempotent on the event id, in the runner's transaction), not once per instance. The
  holder kit in each replica keeps only its own cache honest.

Published (through the outbox, by ``service.py``): ``linkcode.events`` (``pin.linked``,
``device_code.approved``, ``server.claimed``).
"""

from __future__ import annotations

import asyncpg

from services.linkcode.service import LinkCodes
from shared.dispatch import EventHandlers
from shared.events import Envelope, SessionsRevoked


def revocation_handlers(linkcodes: LinkCodes) -> EventHandlers:
    async def on_revoked(conn: asyncpg.Connection, rev: SessionsRevoked, env: Envelope) -> None:
        await linkcodes.on_revocation(rev, conn)

    return EventHandlers("linkcode.revocations", {SessionsRevoked: on_revoked})
