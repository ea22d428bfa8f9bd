"""Throttling in SQL: fixed windows per scope, with blocks that grow past a free allowance.

A scope is a string such as ``signin:login:alice`` or ``link:account:<id>``; callers choose scopes
that never depend on whether an account exists. Counting is one upsert, so concurrent hits are all
counted. The ``throttles`` table comes from the shared migrations.
"""

from __future__ import annotations

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


async def reserve(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]], *, window: int,
                  max_block: int, growing: bool = True) -> float:
    """Reserve one attempt in every ``(scope, free)`` before doing the expensive work (hashing).

    One statement counts the attempt in each scope that is not blocked, and a scope whose count
    passes its ``free`` allowance is blocked at once for 2^(hits-free) seconds (capped), so
    concurrent attempts are held to the budget: the ones arriving while a block stands are not
    counted and get the wait. Returns 0 when the attempt may go on, else the seconds to wait (and
    the counts this call added are taken back). Without ``growing``, a scope past its allowance
    stays blocked until its window ends."""
    names = [s for s, _ in scopes]
    frees = [f for _, f in scopes]
    rows = await conn.fetch(
        """
        INSERT INTO throttles AS t (scope, hits, window_start, blocked_until)
        SELECT u.scope, 1, now(), CASE WHEN u.free < 1 THEN now() + make_interval(secs => 1) END
        FROM unnest($1::text[], $2::int[]) AS u(scope, free)
        ON CONFLICT (scope) DO UPDATE SET
            hits = CASE WHEN t.window_start < now() - make_interval(secs => $3) THEN 1 ELSE t.hits + 1 END,
            window_start = CASE WHEN t.window_start < now() - make_interval(secs => $3) THEN now()
                                ELSE t.window_start END,
            blocked_until = CASE
                WHEN t.window_start < now() - make_interval(secs => $3) THEN NULL
                WHEN t.hits + 1 > (SELECT v.free FROM unnest($1::text[], $2::int[]) AS v(scope, free)
                                   WHERE v.scope = t.scope LIMIT 1)
                THEN CASE WHEN $5 THEN now() + make_interval(secs => least($4, power(2, least(t.hits + 1 - (
                    SELECT v.free FROM unnest($1::text[], $2::int[]) AS v(scope, free)
                    WHERE v.scope = t.scope LIMIT 1), 20))))
                    ELSE t.window_start + make_interval(secs => $3) END
                ELSE t.blocked_until END
        WHERE t.blocked_until IS NULL OR t.blocked_until <= now()
        RETURNING t.scope
        """,
        names, frees, float(window), float(max_block), growing,
    )
    counted = {r["scope"] for r in rows}
    if len(counted) == len(names):
        return 0.0
    if counted:
        await release(conn, [(s, f) for s, f in scopes if s in counted])
    return max(await blocked_for(conn, names), 1.0)


async def release(conn: asyncpg.Connection | asyncpg.Pool, scopes: list[tuple[str, int]]) -> None:
    """Take back one reserved attempt in each ``(scope, free)`` (an attempt that was not a failure);
    a block that this attempt's count set is lifted with it."""
    await conn.execute(
        """
        UPDATE throttles t SET hits = greatest(t.hits - 1, 0),
            blocked_until = CASE WHEN t.hits - 1 <= u.free THEN NULL ELSE t.blocked_until END
        FROM unnest($1::text[], $2::int[]) AS u(scope, free) WHERE t.scope = u.scope
        """,
        [s for s, _ in scopes], [f for _, f in scopes],
    )


async def settle(conn: asyncpg.Connection | asyncpg.Pool, clear_scope: str, release_scopes: list[tuple[str, int]]
                 ) -> None:
    """A reserved attempt that succeeded, in one statement: ``clear_scope`` is forgiven (deleted) and
    one attempt is given back to each of ``release_scopes`` (see :func:`release`)."""
    await conn.execute(
        """
        WITH forgiven AS (DELETE FROM throttles WHERE scope = $1)
        UPDATE throttles t SET hits = greatest(t.hits - 1, 0),
            blocked_until = CASE WHEN t.hits - 1 <= u.free THEN NULL ELSE t.blocked_until END
        FROM unnest($2::text[], $3::int[]) AS u(scope, free) WHERE t.scope = u.scope
        """,
        clear_scope, [s for s, _ in release_scopes], [f for _, f in release_scopes],
    )
