"""Housekeeping: the relay leader purges published outbox rows and old processed-event markers,
and keeps what is unpublished or still inside the retention."""

from __future__ import annotations

import uuid

from shared import db
from shared.outbox import OutboxRelay


async def test_purge_keeps_unpublished_and_recent_rows(scratch_db: str) -> None:
    pool = await db.create_pool(scratch_db, max_size=2)
    try:
        async with pool.acquire() as conn:
            for published, age in (("now() - interval '2 days'", "2 days"), ("now()", "0"), ("NULL", "3 days")):
                await conn.execute(
                    "INSERT INTO outbox (event_id, topic, key, event_type, payload, created_at, published_at)"
                    f" VALUES ($1, 't', 'k', 'x', '\\x00', now() - interval '{age}', {published})", uuid.uuid4())
            for age in ("9 days", "1 day"):
                await conn.execute("INSERT INTO processed_events (consumer, event_id, processed_at)"
                                   f" VALUES ('g', $1, now() - interval '{age}')", uuid.uuid4())
        relay = OutboxRelay(scratch_db, pool, None, service="t",  # type: ignore[arg-type]
                            retention_seconds=86400, processed_retention=8 * 86400)
        assert await relay._purge() == 2
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 2
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 1
            assert await conn.fetchval("SELECT count(*) FROM processed_events") == 1
    finally:
        await pool.close()
