"""Throttling in SQL: fixed windows per scope, with blocks that grow past a free allowance.

A scope is a string such as ``signin:login:alice`` or ``link:account:<id>``; callers choose scopes
that never depend on whether an account exists. Counting is one upsert, so concurrent hits are all
counted. The ``throttles`` table comes from the shared migrations.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg


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


async def clear(conn: asyncpg.Connection | asyncpg.Pool, scope: str) -> None:
    await conn.execute("DELETE FROM throttles WHERE scope = $1", scope)


async def purge(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    await conn.execute("DELETE FROM throttles WHERE window_start < now() - interval '1 day'"
                       " AND (blocked_until IS NULL OR blocked_until < now())")


_FREE_OF = "(SELECT v.free FROM unnest($1::text[], $2::int[]) AS v(scope, free) WHERE v.scope = t.scope LIMIT 1)"
_EXPIRED = "t.window_start < now() - make_interval(secs => $3)"
_settled: asyncio.Condition | None = None


def _condition() -> asyncio.Condition:
    global _settled
    if _settled is None:
        _settled = asyncio.Condition()
    return _settled


async def _wake_one() -> None:
    cond = _condition()
    async with cond:
        cond.notify(1)


async def reserve(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]], *, window: int,
                  busy_wait: float = 10.0) -> float:
    """Reserve one attempt in every ``(scope, free)`` before the expensive or guessable step.

    An attempt is admitted, atomically in one statement, only while the scope is not blocked and
    its failures plus the attempts still in flight (``pending``) stay within ``free`` (past the
    allowance: one attempt at a time after each block ends). So parallel guesses are held to the
    budget: those beyond it wait for the ones in flight to settle (right ones give their place
    back, wrong ones count and may block), then go on or get the block. Settle every admitted
    attempt with :func:`fail`, :func:`settle` or :func:`release`. Returns 0 when admitted, else
    the seconds to wait."""
    names = [s for s, _ in scopes]
    frees = [f for _, f in scopes]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + busy_wait
    while True:
        rows = await conn.fetch(
            f"""
            INSERT INTO throttles AS t (scope, hits, window_start, pending)
            SELECT u.scope, 0, now(), 1 FROM unnest($1::text[], $2::int[]) AS u(scope, free)
            ON CONFLICT (scope) DO UPDATE SET
                pending = t.pending + 1,
                hits = CASE WHEN {_EXPIRED} THEN 0 ELSE t.hits END,
                blocked_until = CASE WHEN {_EXPIRED} THEN NULL ELSE t.blocked_until END,
                window_start = CASE WHEN {_EXPIRED} THEN now() ELSE t.window_start END
            WHERE {_EXPIRED}
               OR ((t.blocked_until IS NULL OR t.blocked_until <= now())
                   AND (t.hits + t.pending <= {_FREE_OF} OR (t.hits > {_FREE_OF} AND t.pending = 0)))
            RETURNING t.scope
            """,
            names, frees, float(window),
        )
        counted = {r["scope"] for r in rows}
        if len(counted) == len(names):
            return 0.0
        if counted:
            await _unpend(conn, [s for s in names if s in counted])
        wait = await blocked_for(conn, names)
        if wait > 0:
            return max(wait, 1.0)
        if loop.time() >= deadline:
            return 1.0
        # Full of attempts in flight: wait until one settles here (or briefly, for other replicas).
        cond = _condition()
        async with cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cond.wait(), 0.1)


async def _unpend(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[str]) -> None:
    await conn.execute("UPDATE throttles SET pending = greatest(pending - 1, 0) WHERE scope = ANY($1::text[])",
                       scopes)


async def fail(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]], *, window: int,
               max_block: int, growing: bool = True) -> None:
    """A reserved attempt that failed: it counts; past ``free`` the scope is blocked for 2^(hits-free)
    seconds (capped at ``max_block``) when ``growing``, else until its window ends."""
    await conn.execute(
        """
        UPDATE throttles t SET pending = greatest(t.pending - 1, 0), hits = t.hits + 1,
            blocked_until = CASE WHEN t.hits + 1 <= u.free THEN t.blocked_until
                                 WHEN $4 THEN now() + make_interval(
                                     secs => least($3, power(2, least(t.hits + 1 - u.free, 20))))
                                 ELSE t.window_start + make_interval(secs => $5) END
        FROM unnest($1::text[], $2::int[]) AS u(scope, free) WHERE t.scope = u.scope
        """,
        [s for s, _ in scopes], [f for _, f in scopes], float(max_block), growing, float(window),
    )
    await _wake_one()


async def release(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]]) -> None:
    """A reserved attempt that was not a failure: its place is given back, nothing is counted."""
    await _unpend(conn, [s for s, _ in scopes])
    await _wake_one()


async def settle(conn: asyncpg.Connection | asyncpg.Pool, clear_scope: str, release_scopes: list[tuple[str, int]]
                 ) -> None:
    """A reserved attempt that succeeded, in one statement: ``clear_scope``'s failures are forgiven
    and its block lifted, and the attempt's place is given back in every scope."""
    names = [clear_scope, *[s for s, _ in release_scopes]]
    await conn.execute(
        "UPDATE throttles SET pending = greatest(pending - 1, 0),"
        " hits = CASE WHEN scope = $1 THEN 0 ELSE hits END,"
        " blocked_until = CASE WHEN scope = $1 THEN NULL ELSE blocked_until END"
        " WHERE scope = ANY($2::text[])",
        clear_scope, names,
    )
    await _wake_one()
