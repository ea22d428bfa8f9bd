"""SMTP_RATE holds for the whole deployment: two replicas' senders share one per-second budget."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from services.notification.delivery import SharedRate
from shared import db

MIGRATION = Path(__file__).resolve().parents[2] / "services" / "notification" / "migrations" / "0002_send_budget.sql"


async def test_two_replicas_together_stay_within_the_rate(scratch_db: str) -> None:
    pools = [await db.create_pool(scratch_db, max_size=2) for _ in range(2)]
    try:
        async with pools[0].acquire() as conn:
            await conn.execute(MIGRATION.read_text())
        replicas = [SharedRate(p, 20) for p in pools]
        sent: list[float] = []

        async def sender(rate: SharedRate, until: float) -> None:
            while time.monotonic() < until:
                await rate.acquire()
                sent.append(time.time())

        until = time.monotonic() + 3.2
        await asyncio.gather(*(sender(r, until) for r in replicas for _ in range(2)))
        per_second = Counter(int(t) for t in sent)
        assert max(per_second.values()) <= 20, per_second
        assert len(sent) >= 40, per_second  # both replicas kept sending
        async with pools[0].acquire() as conn:
            assert await conn.fetchval("SELECT max(used) FROM send_budget") <= 20
    finally:
        for p in pools:
            await p.close()
