"""Plain SQL over asyncpg for recipients and deliveries.

Delivery rows move queued -> sending -> sent | failed (retry later) | dead. Claiming is one
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`` ordered by priority, so several
senders never take the same row and password-reset emails go before breach notices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg


@dataclass(frozen=True)
class Delivery:
    id: int
    event_id: UUID
    part: int
    kind: str
    priority: int
    account_id: UUID | None
    email: str | None
    context: dict[str, Any]
    attempts: int
    created_at: datetime


async def upsert_recipient(conn: asyncpg.Connection, account_id: UUID, email: str, username: str) -> None:
    await conn.execute(
        "INSERT INTO recipients (account_id, email, username) VALUES ($1, $2, $3)"
        " ON CONFLICT (account_id) DO UPDATE SET email = EXCLUDED.email, username = EXCLUDED.username,"
        " updated_at = now()",
        account_id, email, username,
    )


async def find_recipient(conn: asyncpg.Connection, account_id: UUID) -> tuple[str, str] | None:
    row = await conn.fetchrow("SELECT email, username FROM recipients WHERE account_id = $1", account_id)
    return (row["email"], row["username"]) if row else None


async def insert_deliveries(conn: asyncpg.Connection, event_id: UUID, kind: str, priority: int,
                            items: Sequence[tuple[UUID | None, str | None, dict[str, Any]]],
                            incident_id: str | None = None) -> int:
    """Queue one delivery per item (part = position); idempotent on (event id, part)."""
    if not items:
        return 0
    result = await conn.execute(
        "INSERT INTO deliveries (event_id, part, kind, priority, account_id, email, context, incident_id)"
        " SELECT $1, p, $2, $3, a, e, c, $7 FROM unnest($4::uuid[], $5::text[], $6::jsonb[])"
        "   WITH ORDINALITY AS x(a, e, c, p)"
        " ON CONFLICT (event_id, part) DO NOTHING",
        event_id, kind, priority, [i[0] for i in items], [i[1] for i in items], [i[2] for i in items], incident_id,
    )
    return int(result.split()[-1])


async def claim_due(conn: asyncpg.Connection | asyncpg.Pool, limit: int) -> list[Delivery]:
    rows = await conn.fetch(
        """
        UPDATE deliveries SET status = 'sending', attempts = attempts + 1, claimed_at = now()
        WHERE id IN (SELECT id FROM deliveries WHERE status IN ('queued', 'failed') AND next_attempt_at <= now()
                     ORDER BY priority, id LIMIT $1 FOR UPDATE SKIP LOCKED)
        RETURNING id, event_id, part, kind, priority, account_id, email, context, attempts, created_at
        """,
        limit,
    )
    return sorted((Delivery(**dict(r)) for r in rows), key=lambda d: (d.priority, d.id))


async def mark_sent(conn: asyncpg.Connection | asyncpg.Pool, delivery_id: int) -> None:
    await conn.execute("UPDATE deliveries SET status = 'sent', sent_at = now(), last_error = NULL WHERE id = $1",
                       delivery_id)


async def mark_failed(conn: asyncpg.Connection | asyncpg.Pool, delivery_id: int, error: str, delay: float) -> None:
    await conn.execute(
        "UPDATE deliveries SET status = 'failed', last_error = $2,"
        " next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
        delivery_id, error[:1000], delay,
    )


async def mark_dead(conn: asyncpg.Connection, delivery_id: int, error: str) -> None:
    await conn.execute("UPDATE deliveries SET status = 'dead', last_error = $2 WHERE id = $1",
                       delivery_id, error[:1000])


async def requeue_stale(conn: asyncpg.Connection | asyncpg.Pool, older_than: float) -> int:
    """Rows left 'sending' by a crash go back to the queue (the documented duplicate window)."""
    result = await conn.execute(
        "UPDATE deliveries SET status = 'queued' WHERE status = 'sending'"
        " AND claimed_at < now() - make_interval(secs => $1)",
        older_than,
    )
    return int(result.split()[-1])


async def oldest_due_age(conn: asyncpg.Connection | asyncpg.Pool, priorities: list[int]) -> float:
    """Age of the oldest waiting delivery: the first one of each priority in the due index (ids grow
    with time), so a queue of a million rows costs a few index probes, not a scan."""
    value = await conn.fetchval(
        "SELECT extract(epoch FROM now() - min(d.created_at)) FROM unnest($1::smallint[]) AS p(priority)"
        " CROSS JOIN LATERAL (SELECT created_at FROM deliveries WHERE status IN ('queued', 'failed')"
        "   AND priority = p.priority ORDER BY id LIMIT 1) d",
        priorities,
    )
    return float(value or 0.0)


async def incident_counts(conn: asyncpg.Connection | asyncpg.Pool, incident_id: str) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM deliveries WHERE incident_id = $1 GROUP BY status",
                            incident_id)
    return {r["status"]: int(r["n"]) for r in rows}
