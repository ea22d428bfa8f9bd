"""shared.throttle against a real PostgreSQL: reservations under concurrency, lock order, and
reservations left behind by a process that died."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from shared import throttle

pytestmark = pytest.mark.asyncio


async def test_concurrent_reservations_and_settlements_never_deadlock(scratch_db: str) -> None:
    """Sign-ins of many accounts from one address settle while others reserve: every statement that
    writes several scopes locks them in one order, so none waits for another in a cycle."""
    pool = await asyncpg.create_pool(scratch_db, min_size=12, max_size=12)
    try:
        async def attempt(i: int) -> None:
            scopes = [(f"signin:account:{i % 4}", 1000), ("signin:addr:192.0.2.1", 100000)]
            assert await throttle.reserve(pool, scopes, window=900) == 0
            await asyncio.sleep(0)
            if i % 3:
                await throttle.settle(pool, scopes[0][0], scopes[1:])
            else:
                await throttle.fail(pool, scopes, window=900, max_block=60)

        await asyncio.wait_for(asyncio.gather(*(attempt(i) for i in range(600))), 120)
        pending = await pool.fetchval("SELECT sum(pending) FROM throttles")
        assert pending == 0
    finally:
        await pool.close()


async def test_parallel_attempts_beyond_the_budget_wait_for_places_then_get_the_block(scratch_db: str) -> None:
    pool = await asyncpg.create_pool(scratch_db, min_size=4, max_size=12)
    try:
        scopes = [("code:account:x", 3)]
        admitted = 0

        async def guess() -> float:
            nonlocal admitted
            wait = await throttle.reserve(pool, scopes, window=900, busy_wait=5)
            if wait == 0:
                admitted += 1
                await asyncio.sleep(0.05)
                await throttle.fail(pool, scopes, window=900, max_block=60)
            return wait

        waits = await asyncio.gather(*(guess() for _ in range(12)))
        # 3 free failures, then the one that sets the block: the rest are told how long to wait.
        assert admitted == 4
        assert sum(1 for w in waits if w >= 1) == 8
    finally:
        await pool.close()


async def test_a_reservation_left_by_a_dead_process_stops_counting_after_a_minute(scratch_db: str) -> None:
    pool = await asyncpg.create_pool(scratch_db, min_size=1, max_size=2)
    try:
        scopes = [("signin:account:y", 1)]
        # A process reserved both places of the scope and died before settling either.
        assert await throttle.reserve(pool, scopes, window=900) == 0
        assert await throttle.reserve(pool, scopes, window=900) == 0
        assert await throttle.reserve(pool, scopes, window=900, busy_wait=0.3) > 0  # full while in flight
        await pool.execute("UPDATE throttles SET pending_at = now() - make_interval(secs => $1)",
                           throttle.STALE_PENDING + 1)
        assert await throttle.reserve(pool, scopes, window=900, busy_wait=0.3) == 0
        assert await pool.fetchval("SELECT pending FROM throttles WHERE scope = $1", scopes[0][0]) == 1
    finally:
        await pool.close()
