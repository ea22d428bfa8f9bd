"""Acknowledgements applied in batches by two devicesession replicas at once (the consumer runner
gives each replica what one poll brought of its partitions in one transaction)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from services.devicesession import events
from services.devicesession.app import MIGRATIONS
from shared import db
from shared.events import RevocationApplied, envelope, iso

pytestmark = pytest.mark.timeout(120)


def _acks(revocation: uuid.UUID, holders: list[str]) -> list[RevocationApplied]:
    now = iso(datetime.now(UTC))
    return [RevocationApplied(holder_id=h, revocation_id=str(revocation), applied_at=now, revoked_at=now, evicted=1,
                              instance_id=f"{h}-1") for h in holders]


async def test_two_replicas_batching_acknowledgements_in_opposite_orders_do_not_deadlock(scratch_db: str) -> None:
    """Two revocations on two partitions, each acknowledged by the same holder instances in opposite
    orders, applied at the same time by two replicas, each in one transaction: both commit, with every
    acknowledgement and every instance's seen-time recorded. (Writing the shared holder rows inside
    the batch made the second replica wait on rows the first held, and the first on the second's.)"""
    pool = await db.create_pool(scratch_db, max_size=6)
    try:
        await db.migrate(pool, [("devicesession", MIGRATIONS)])
        holders = [f"h{i:02d}" for i in range(12)]
        # Known instances, last heard of a minute ago (the usual case: their seen-times get refreshed).
        for h in holders:
            await pool.execute("INSERT INTO holders (id, last_seen_at) VALUES ($1, now() - interval '1 minute')", h)
            await pool.execute("INSERT INTO holder_instances (holder_id, instance_id, last_seen_at)"
                               " VALUES ($1, $2, now() - interval '1 minute')", h, f"{h}-1")
        first, second = uuid.uuid4(), uuid.uuid4()
        both_started = asyncio.Barrier(2)

        async def replica(acks: list[RevocationApplied]) -> None:
            handler = events.make_ack_handler(pool)  # one per replica, as each process has its own
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL deadlock_timeout = '200ms'")
                for i, ack in enumerate(acks):
                    await handler(conn, envelope(ack, producer="tests", key=ack.revocation_id))
                    if i == 0:
                        await both_started.wait()  # each holds its first rows before the other goes on
                    await asyncio.sleep(0.01)

        await asyncio.wait_for(asyncio.gather(replica(_acks(first, holders)), replica(_acks(second, holders[::-1]))),
                               30)
        recorded = await pool.fetchval("SELECT count(*) FROM revocation_acks WHERE revocation_id = ANY($1::uuid[])",
                                       [first, second])
        assert recorded == 2 * len(holders)
        fresh = "last_seen_at > now() - interval '10 seconds'"
        assert {r["holder_id"] for r in await pool.fetch(f"SELECT holder_id FROM holder_instances WHERE {fresh}")} \
            == set(holders)
        assert {r["id"] for r in await pool.fetch(f"SELECT id FROM holders WHERE {fresh}")} == set(holders)
    finally:
        await pool.close()


async def test_an_acknowledgement_rolled_back_leaves_the_instance_known(scratch_db: str) -> None:
    """The seen-times are written outside the event's transaction: an acknowledgement whose batch
    rolls back is applied again later, and the instance is known either way."""
    pool = await db.create_pool(scratch_db, max_size=4)
    try:
        await db.migrate(pool, [("devicesession", MIGRATIONS)])
        handler = events.make_ack_handler(pool)
        [ack] = _acks(uuid.uuid4(), ["solo"])
        with pytest.raises(RuntimeError):
            async with pool.acquire() as conn, conn.transaction():
                await handler(conn, envelope(ack, producer="tests", key=ack.revocation_id))
                raise RuntimeError("the batch failed later")
        assert await pool.fetchval("SELECT count(*) FROM revocation_acks") == 0
        assert await pool.fetchval("SELECT count(*) FROM holder_instances WHERE holder_id = 'solo'") == 1
    finally:
        await pool.close()
