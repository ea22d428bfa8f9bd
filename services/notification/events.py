"""notification's consumer: auth.events, devicesession.events and linkcode.events become delivery
rows (see service.queue_for_event), idempotently, in the runner's transaction."""

from __future__ import annotations

import asyncpg

from services.notification.service import queue_for_event
from shared.events import Envelope


async def handle_event(conn: asyncpg.Connection, env: Envelope) -> None:
    await queue_for_event(conn, env)
