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
