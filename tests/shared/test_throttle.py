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


async def test_a_reservation_with_a_reading_reserves_the_scope_the_read_decides(scratch_db: str) -> None:
    """Sign-in's shape: the lead scope comes from a read in the same statement (the account a login
    names, else the login string), the answer carries the read, and a refusal writes nothing."""
    pool = await asyncpg.create_pool(scratch_db, min_size=1, max_size=2)
    try:
        await pool.execute("CREATE TABLE people (id int PRIMARY KEY, login text UNIQUE)")
        await pool.execute("INSERT INTO people VALUES (7, 'ann')")

        def reading(login: str) -> throttle.Reading:
            return throttle.Reading(cte="p AS (SELECT id, login FROM people WHERE login = $4)",
                                    lead="coalesce('person:' || (SELECT id::text FROM p), 'login:' || $4)", free=1,
                                    columns="(SELECT id FROM p) AS id", args=(login,))

        wait, row = await throttle.reserve_reading(pool, reading("ann"), [("addr:x", 5)], window=900)
        assert wait == 0 and row["id"] == 7 and list(row["names"]) == ["person:7", "addr:x"]
        wait, row = await throttle.reserve_reading(pool, reading("bob"), [("addr:x", 5)], window=900)
        assert wait == 0 and row["id"] is None and list(row["names"]) == ["login:bob", "addr:x"]
        await throttle.fail(pool, [("person:7", 1), ("addr:x", 5)], window=900, max_block=60)
        await throttle.fail(pool, [("person:7", 1), ("addr:x", 5)], window=900, max_block=60)  # blocks person:7
        before = await pool.fetchval("SELECT pending FROM throttles WHERE scope = 'addr:x'")
        wait, row = await throttle.reserve_reading(pool, reading("ann"), [("addr:x", 5)], window=900, busy_wait=0.2)
        assert wait >= 1 and row["id"] == 7
        assert await pool.fetchval("SELECT pending FROM throttles WHERE scope = 'addr:x'") == before
    finally:
        await pool.close()


async def test_coalesced_settlements_give_back_every_place_and_forgive_the_failures(scratch_db: str) -> None:
    """Settler: concurrent successes go in shared statements; each place is given back once, each
    settled account's failures are forgiven, and an address shared by all of them ends at 0."""
    pool = await asyncpg.create_pool(scratch_db, min_size=4, max_size=8)
    try:
        settler = throttle.Settler(pool)
        for i in range(8):
            assert await throttle.reserve(pool, [(f"signin:account:{i}", 5)], window=900) == 0
            await throttle.fail(pool, [(f"signin:account:{i}", 5)], window=900, max_block=60)

        async def attempt(i: int) -> None:
            scopes = [(f"signin:account:{i % 8}", 1000), ("signin:addr:192.0.2.9", 100000)]
            assert await throttle.reserve(pool, scopes, window=900) == 0
            await settler.settle(scopes[0][0], scopes[1:])

        await asyncio.wait_for(asyncio.gather(*(attempt(i) for i in range(200))), 60)
        rows = await pool.fetch("SELECT scope, pending, hits FROM throttles ORDER BY scope")
        assert all(r["pending"] == 0 and r["hits"] == 0 for r in rows), rows
        assert len(rows) == 9
    finally:
        await pool.close()


async def test_a_coalesced_settlement_wakes_one_waiter_per_place_it_gives_back(scratch_db: str) -> None:
    """Three attempts in flight fill a scope; three more wait (long enough for their polling to back
    off to about a second). The three successes settle together (coalesced): each place given back
    wakes a waiter at once, so all three waiters are admitted well before their next poll."""
    pool = await asyncpg.create_pool(scratch_db, min_size=4, max_size=8)
    try:
        scope = [("signin:account:coalesced", 2)]  # two free failures: three attempts in flight at most
        for _ in range(3):
            assert await throttle.reserve(pool, scope, window=900) == 0
        admitted: list[float] = []
        loop = asyncio.get_running_loop()

        async def waiter() -> None:
            assert await throttle.reserve(pool, scope, window=900, busy_wait=30) == 0
            admitted.append(loop.time())

        waiting = [asyncio.create_task(waiter()) for _ in range(3)]
        await asyncio.sleep(2.0)  # polls at 50, 100, 200, 400, 800 ms: the next one is about 1 s away
        assert not admitted
        settler = throttle.Settler(pool)
        settled_at = loop.time()
        await asyncio.gather(*(settler.settle(scope[0][0], []) for _ in range(3)))
        await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert max(admitted) - settled_at < 0.3, [round(t - settled_at, 3) for t in admitted]
        assert await pool.fetchval("SELECT pending FROM throttles WHERE scope = $1", scope[0][0]) == 3
    finally:
        await pool.close()


async def test_a_gated_settlement_clears_the_gated_scope_only_when_its_gate_wrote(scratch_db: str) -> None:
    """settle_if (two-step sign-in's shape): the password's scopes are settled either way; the code
    budget's reserved place is cleared with the gate's write (a time step used once), and left to the
    caller when the gate wrote nothing (a replayed step)."""
    pool = await asyncpg.create_pool(scratch_db, min_size=1, max_size=4)
    try:
        await pool.execute("CREATE TABLE steps (id int PRIMARY KEY, last int NOT NULL)")
        await pool.execute("INSERT INTO steps VALUES (1, 0)")
        gate = "gate AS (UPDATE steps SET last = $6 WHERE id = $5 AND last < $6 RETURNING 1)"
        scopes = [("acct:g", 5), ("addr:g", 20), ("code:g", 5)]
        await throttle.fail(pool, [("code:g", 5)], window=900, max_block=60)  # an earlier wrong code
        assert await throttle.reserve(pool, scopes, window=900) == 0
        assert await throttle.settle_if(pool, "acct:g", [("addr:g", 20)], gated="code:g", gate=gate, args=(1, 7))
        rows = {r["scope"]: (r["hits"], r["pending"]) for r in await pool.fetch("SELECT * FROM throttles")}
        assert rows == {"acct:g": (0, 0), "addr:g": (0, 0), "code:g": (0, 0)}
        assert await pool.fetchval("SELECT last FROM steps") == 7
        # The same step again: the gate writes nothing, the code's place stays for the caller to fail.
        assert await throttle.reserve(pool, scopes, window=900) == 0
        assert not await throttle.settle_if(pool, "acct:g", [("addr:g", 20)], gated="code:g", gate=gate, args=(1, 7))
        rows = {r["scope"]: (r["hits"], r["pending"]) for r in await pool.fetch("SELECT * FROM throttles")}
        assert rows == {"acct:g": (0, 0), "addr:g": (0, 0), "code:g": (0, 1)}
        await throttle.fail(pool, [("code:g", 5)], window=900, max_block=60)
        assert await pool.fetchval("SELECT hits FROM throttles WHERE scope = 'code:g'") == 1
    finally:
        await pool.close()


async def test_a_reading_reserves_further_scopes_each_with_its_own_window(scratch_db: str) -> None:
    """Reading.more: scopes decided by the read, reserved after the lead, each counting in its own
    window (a code budget's window need not be the password's)."""
    pool = await asyncpg.create_pool(scratch_db, min_size=1, max_size=2)
    try:
        await pool.execute("CREATE TABLE folks (id int PRIMARY KEY, login text UNIQUE)")
        await pool.execute("INSERT INTO folks VALUES (3, 'cy')")
        reading = throttle.Reading(cte="p AS (SELECT id FROM folks WHERE login = $4)",
                                   lead="coalesce('p:' || (SELECT id::text FROM p), 'l:' || $4)", free=5,
                                   columns="(SELECT id FROM p) AS id", args=("cy",),
                                   more=(("coalesce('c:' || (SELECT id::text FROM p), 'lc:' || $4)", 1, 1),))
        wait, row = await throttle.reserve_reading(pool, reading, [("a:cy", 5)], window=900)
        assert wait == 0 and row["id"] == 3 and list(row["names"]) == ["p:3", "c:3", "a:cy"]
        await throttle.fail(pool, [("p:3", 5), ("c:3", 1), ("a:cy", 5)], window=900, max_block=60)
        # Two seconds on, c:3's window (1 s) has ended and counts from zero again; the others' (900 s) have not.
        await pool.execute("UPDATE throttles SET window_start = now() - interval '2 seconds'")
        wait, row = await throttle.reserve_reading(pool, reading, [("a:cy", 5)], window=900, busy_wait=0.2)
        assert wait == 0
        hits = {r["scope"]: r["hits"] for r in await pool.fetch("SELECT scope, hits FROM throttles")}
        assert hits == {"p:3": 1, "c:3": 0, "a:cy": 1}
    finally:
        await pool.close()
