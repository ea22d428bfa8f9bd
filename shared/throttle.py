"""Throttling in SQL: fixed windows per scope, with blocks that grow past a free allowance.

A scope is a string such as ``signin:login:alice`` or ``link:account:<id>``; callers choose scopes
that never depend on whether an account exists. Counting is one upsert, so concurrent hits are all
counted. The ``throttles`` table comes from the shared migrations.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from shared.errors import Throttled


def refuse_if_waiting(wait: float, error: type[Throttled], what: str, *, code: str | None = None) -> None:
    """The one way Hearth refuses a throttled attempt: ``error`` saying ``what`` and "try again in N
    seconds", with ``Retry-After: N`` (N rounded up, at least 1), when ``wait`` is above 0."""
    if wait <= 0:
        return
    seconds = int(wait) + 1
    raise error(f"{what}; try again in {seconds} seconds", retry_after=seconds, code=code)



async def blocked_for(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[str]) -> float:
    """Seconds until every scope is unblocked (0 when none is blocked)."""
    value = await conn.fetchval(
        "SELECT max(extract(epoch FROM blocked_until - now())) FROM throttles"
        " WHERE scope = ANY($1::text[]) AND blocked_until > now()",
        scopes,
    )
    return float(value or 0.0)


async def hit(conn: asyncpg.Connection | asyncpg.Pool, scope: str, *, free: int, window: int, max_block: int,
              growing: bool = True) -> int:
    """Count one hit in the scope's window; past ``free`` hits, block the scope: for 2^(hits-free)
    seconds (capped at ``max_block``) when ``growing``, else until the window ends. Returns the hit
    count in the current window."""
    hits: int = await conn.fetchval(
        """
        INSERT INTO throttles AS t (scope, hits, window_start) VALUES ($1, 1, now())
        ON CONFLICT (scope) DO UPDATE SET
            hits = CASE WHEN t.window_start < now() - make_interval(secs => $2) THEN 1 ELSE t.hits + 1 END,
            window_start = CASE WHEN t.window_start < now() - make_interval(secs => $2) THEN now()
                                ELSE t.window_start END
        RETURNING hits
        """,
        scope, float(window),
    )
    if hits > free:
        if growing:
            await conn.execute(
                "UPDATE throttles SET blocked_until = now() + make_interval(secs => $2) WHERE scope = $1",
                scope, float(min(max_block, 2 ** min(hits - free, 20))))
        else:
            await conn.execute(
                "UPDATE throttles SET blocked_until = window_start + make_interval(secs => $2) WHERE scope = $1",
                scope, float(window))
    return hits


async def count_attempt(conn: asyncpg.Connection | asyncpg.Pool, scope: str, *, free: int, window: int,
                           max_block: int) -> float:
    """Count one code attempt unless the scope is blocked, in one statement. Returns 0 when the
    attempt may proceed, else the seconds until the block ends. Past ``free`` attempts in the window,
    each attempt blocks the scope for 2^(attempts - free) seconds (capped)."""
    row = await conn.fetchrow(
        """
        WITH hit AS (
            INSERT INTO throttles AS t (scope, hits, window_start) VALUES ($1, 1, now())
            ON CONFLICT (scope) DO UPDATE SET
                hits = CASE WHEN t.window_start < now() - make_interval(secs => $2) THEN 1 ELSE t.hits + 1 END,
                window_start = CASE WHEN t.window_start < now() - make_interval(secs => $2) THEN now()
                                    ELSE t.window_start END,
                blocked_until = CASE
                    WHEN (CASE WHEN t.window_start < now() - make_interval(secs => $2) THEN 1 ELSE t.hits + 1 END) > $3
                    THEN now() + make_interval(secs => least($4::float8, power(2, least(
                        (CASE WHEN t.window_start < now() - make_interval(secs => $2) THEN 1 ELSE t.hits + 1 END) - $3,
                        20))::float8))
                    ELSE NULL END
            WHERE t.blocked_until IS NULL OR t.blocked_until <= now()
            RETURNING hits
        )
        SELECT (SELECT hits FROM hit) AS hits,
               coalesce((SELECT extract(epoch FROM blocked_until - now()) FROM throttles WHERE scope = $1), 0)::float8
                   AS blocked_for
        """,
        scope, float(window), free, float(max_block),
    )
    assert row is not None
    if row["hits"] is not None:
        return 0.0
    return max(float(row["blocked_for"]), 0.001)


async def clear(conn: asyncpg.Connection | asyncpg.Pool, scope: str) -> None:
    await conn.execute("DELETE FROM throttles WHERE scope = $1", scope)


async def purge(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    await conn.execute("DELETE FROM throttles WHERE window_start < now() - interval '1 day'"
                       " AND (blocked_until IS NULL OR blocked_until < now())")


# No attempt stays in flight this long (a hash, a code lookup): older reservations belong to a
# process that died before settling them, and no longer count.
STALE_PENDING = 60.0
_PENDING = f"(CASE WHEN t.pending_at < now() - interval '{STALE_PENDING:.0f} seconds' THEN 0 ELSE t.pending END)"
_FREE_OF = "(SELECT v.free FROM unnest($1::text[], $2::int[]) AS v(scope, free) WHERE v.scope = t.scope LIMIT 1)"
_EXPIRED = "t.window_start < now() - make_interval(secs => $3)"
# An attempt is admitted while the scope is not blocked and its failures plus the attempts in flight
# stay within the allowance (past it: one attempt at a time after each block ends).
_ADMITS = (f"((t.blocked_until IS NULL OR t.blocked_until <= now())"
           f" AND (t.hits + {_PENDING} <= {_FREE_OF} OR (t.hits > {_FREE_OF} AND {_PENDING} = 0)))")
_RESERVE = f"""
    WITH refusing AS (
        SELECT t.scope, t.blocked_until FROM throttles t
        WHERE t.scope = ANY($1::text[]) AND NOT {_EXPIRED} AND NOT {_ADMITS}
    ), taken AS (
        INSERT INTO throttles AS t (scope, hits, window_start, pending, pending_at)
        SELECT u.scope, 0, now(), 1, now() FROM unnest($1::text[], $2::int[]) AS u(scope, free)
        WHERE NOT EXISTS (SELECT 1 FROM refusing) ORDER BY u.scope
        ON CONFLICT (scope) DO UPDATE SET
            pending = {_PENDING} + 1,
            pending_at = now(),
            hits = CASE WHEN {_EXPIRED} THEN 0 ELSE t.hits END,
            blocked_until = CASE WHEN {_EXPIRED} THEN NULL ELSE t.blocked_until END,
            window_start = CASE WHEN {_EXPIRED} THEN now() ELSE t.window_start END
        WHERE {_EXPIRED} OR {_ADMITS}
        RETURNING t.scope
    )
    SELECT array(SELECT scope FROM taken) AS taken, array(SELECT scope FROM refusing) AS refusing,
           coalesce((SELECT max(extract(epoch FROM blocked_until - now())) FROM refusing
                     WHERE blocked_until > now()), 0)::float8 AS wait
"""
# Every statement that writes several scopes locks their rows in the order of their names (the
# upsert inserts in that order; updates lock first), so two of them never deadlock.
_LOCKED = "locked AS (SELECT scope FROM throttles WHERE scope = ANY($1::text[]) ORDER BY scope FOR UPDATE)"
# Attempts waiting in this process for a place in a scope, oldest first: a settlement here wakes the
# oldest waiter of each scope it settles at once; settlements in other replicas are seen by polling.
_waiting: dict[str, list[asyncio.Future[None]]] = {}


def _wake(scopes: list[str]) -> None:
    for scope in scopes:
        waiters = _waiting.get(scope)
        while waiters:
            future = waiters.pop(0)
            if not future.done():
                future.set_result(None)
                break
        if not waiters:
            _waiting.pop(scope, None)


async def _wait_for_place(scopes: list[str], seconds: float) -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    for scope in scopes:
        _waiting.setdefault(scope, []).append(future)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), seconds)
    finally:
        for scope in scopes:
            waiters = _waiting.get(scope)
            if waiters and future in waiters:
                waiters.remove(future)
                if not waiters:
                    _waiting.pop(scope, None)


async def reserve(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]], *, window: int,
                  busy_wait: float = 10.0) -> float:
    """Reserve one attempt in every ``(scope, free)`` before the expensive or guessable step.

    An attempt is admitted, atomically in one statement and in all scopes or none, only while no
    scope is blocked and each scope's failures plus the attempts still in flight (``pending``) stay
    within ``free`` (past the allowance: one attempt at a time after each block ends). So parallel
    guesses are held to the budget: those beyond it wait for the ones in flight to settle (right
    ones give their place back, wrong ones count and may block), then go on or get the block. A
    refused attempt writes nothing; a waiting one is woken by a settlement in this process, and
    polls (with backoff) for those of other replicas. Settle every admitted attempt with
    :func:`fail`, :func:`settle` or :func:`release`. Returns 0 when admitted, else the seconds to
    wait."""
    names = [s for s, _ in scopes]
    frees = [f for _, f in scopes]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + busy_wait
    poll = 0.05
    while True:
        row = await conn.fetchrow(_RESERVE, names, frees, float(window))
        assert row is not None
        taken = list(row["taken"])
        if len(taken) == len(names):
            return 0.0
        if taken:  # another attempt took the last place between this statement's check and its write
            await _unpend(conn, taken)
            _wake(taken)
        if row["wait"] > 0:
            return max(float(row["wait"]), 1.0)
        if loop.time() >= deadline:
            return 1.0
        await _wait_for_place(list(row["refusing"]) or names, min(poll, max(0.0, deadline - loop.time())))
        poll = min(poll * 2, 1.0)


async def _unpend(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[str]) -> None:
    await conn.execute(f"WITH {_LOCKED} UPDATE throttles t SET pending = greatest(t.pending - 1, 0)"
                       " FROM locked l WHERE t.scope = l.scope", scopes)


async def fail(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]], *, window: int,
               max_block: int, growing: bool = True) -> None:
    """A reserved attempt that failed: it counts; past ``free`` the scope is blocked for 2^(hits-free)
    seconds (capped at ``max_block``) when ``growing``, else until its window ends."""
    await conn.execute(
        f"""
        WITH {_LOCKED}
        UPDATE throttles t SET pending = greatest(t.pending - 1, 0), hits = t.hits + 1,
            blocked_until = CASE WHEN t.hits + 1 <= u.free THEN t.blocked_until
                                 WHEN $4 THEN now() + make_interval(
                                     secs => least($3, power(2, least(t.hits + 1 - u.free, 20))))
                                 ELSE t.window_start + make_interval(secs => $5) END
        FROM unnest($1::text[], $2::int[]) AS u(scope, free) JOIN locked l USING (scope) WHERE t.scope = u.scope
        """,
        [s for s, _ in scopes], [f for _, f in scopes], float(max_block), growing, float(window),
    )
    _wake([s for s, _ in scopes])


async def release(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]]) -> None:
    """A reserved attempt that was not a failure: its place is given back, nothing is counted."""
    await _unpend(conn, [s for s, _ in scopes])
    _wake([s for s, _ in scopes])


async def settle(conn: asyncpg.Connection | asyncpg.Pool, clear_scope: str, release_scopes: list[tuple[str, int]]
                 ) -> None:
    """A reserved attempt that succeeded, in one statement: ``clear_scope``'s failures are forgiven
    and its block lifted, and the attempt's place is given back in every scope."""
    names = [clear_scope, *[s for s, _ in release_scopes]]
    await conn.execute(
        f"WITH {_LOCKED} UPDATE throttles t SET pending = greatest(t.pending - 1, 0),"
        " hits = CASE WHEN t.scope = $2 THEN 0 ELSE t.hits END,"
        " blocked_until = CASE WHEN t.scope = $2 THEN NULL ELSE t.blocked_until END"
        " FROM locked l WHERE t.scope = l.scope",
        names, clear_scope,
    )
    _wake(names)
