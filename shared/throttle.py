"""Throttling in SQL: fixed windows per scope, with blocks that grow past a free allowance.

A scope is a string such as ``signin:login:alice`` or ``link:account:<id>``; callers choose scopes
that never depend on whether an account exists. Counting is one upsert, so concurrent hits are all
counted. The ``throttles`` table comes from the shared migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools

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
                        max_block: int, read: str = "", columns: str = "", args: tuple[object, ...] = ()
                        ) -> tuple[float, asyncpg.Record]:
    """Count one code attempt unless the scope is blocked, in one statement. Returns 0 when the
    attempt may proceed, else the seconds until the block ends, and the answer. Past ``free``
    attempts in the window, each attempt blocks the scope for 2^(attempts - free) seconds (capped).
    ``read`` (a CTE) is read in the same statement and ``columns`` of it come with the answer; their
    parameters start at $5 and are ``args``."""
    row = await conn.fetchrow(
        f"""
        WITH {read + ", " if read else ""}hit AS (
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
                   AS blocked_for{", " + columns if columns else ""}
        """,
        scope, float(window), free, float(max_block), *args,
    )
    assert row is not None
    if row["hits"] is not None:
        return 0.0, row
    return max(float(row["blocked_for"]), 0.001), row


def clearing(scope: str, when: str) -> str:
    """A CTE that forgives the attempts counted in the scope named by ``scope`` (an SQL parameter)
    when ``when`` holds: the success that settles them, decided in the same statement."""
    return f"cleared AS (DELETE FROM throttles WHERE scope = {scope} AND {when} RETURNING 1)"


async def clear(conn: asyncpg.Connection | asyncpg.Pool, scope: str) -> None:
    await conn.execute("DELETE FROM throttles WHERE scope = $1", scope)


async def purge(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    await conn.execute("DELETE FROM throttles WHERE window_start < now() - interval '1 day'"
                       " AND (blocked_until IS NULL OR blocked_until < now())")


# No attempt stays in flight this long (a hash, a code lookup): older reservations belong to a
# process that died before settling them, and no longer count.
STALE_PENDING = 60.0
_PENDING = f"(CASE WHEN t.pending_at < now() - interval '{STALE_PENDING:.0f} seconds' THEN 0 ELSE t.pending END)"


def _reserve_sql(names: str = "$1::text[]", *, read: str = "", columns: str = "") -> str:
    """The reservation statement over the scope names ``names`` (an SQL array; $2 their allowances,
    $3 their windows in seconds). ``read`` adds a CTE read in the same statement, and ``columns`` its
    columns to the answer (one row even when the read finds none)."""
    free_of = (f"(SELECT v.free FROM unnest({names}, $2::int[]) AS v(scope, free)"
               f" WHERE v.scope = t.scope LIMIT 1)")
    window_of = (f"(SELECT v.w FROM unnest({names}, $3::float8[]) AS v(scope, w)"
                 f" WHERE v.scope = t.scope LIMIT 1)")
    expired = f"t.window_start < now() - make_interval(secs => {window_of})"
    # An attempt is admitted while the scope is not blocked and its failures plus the attempts in
    # flight stay within the allowance (past it: one attempt at a time after each block ends).
    admits = (f"((t.blocked_until IS NULL OR t.blocked_until <= now())"
              f" AND (t.hits + {_PENDING} <= {free_of} OR (t.hits > {free_of} AND {_PENDING} = 0)))")
    return f"""
    WITH {read + ", " if read else ""}refusing AS (
        SELECT t.scope, t.blocked_until FROM throttles t
        WHERE t.scope = ANY({names}) AND NOT {expired} AND NOT {admits}
    ), taken AS (
        INSERT INTO throttles AS t (scope, hits, window_start, pending, pending_at)
        SELECT u.scope, 0, now(), 1, now() FROM unnest({names}, $2::int[]) AS u(scope, free)
        WHERE NOT EXISTS (SELECT 1 FROM refusing) ORDER BY u.scope
        ON CONFLICT (scope) DO UPDATE SET
            pending = {_PENDING} + 1,
            pending_at = now(),
            hits = CASE WHEN {expired} THEN 0 ELSE t.hits END,
            blocked_until = CASE WHEN {expired} THEN NULL ELSE t.blocked_until END,
            window_start = CASE WHEN {expired} THEN now() ELSE t.window_start END
        WHERE {expired} OR {admits}
        RETURNING t.scope
    )
    SELECT array(SELECT scope FROM taken) AS taken, array(SELECT scope FROM refusing) AS refusing,
           coalesce((SELECT max(extract(epoch FROM blocked_until - now())) FROM refusing
                     WHERE blocked_until > now()), 0)::float8 AS wait,
           {names} AS names{", " + columns if columns else ""}
"""


_RESERVE = _reserve_sql()


@dataclasses.dataclass(frozen=True)
class Reading:
    """A read done in the reservation's own statement, when a scope depends on it (sign-in: the
    account a login names decides the account's scope). ``cte`` is the CTE (``name AS (...)``),
    ``lead`` the SQL text of the scope it decides (it may read the CTE), with allowance ``free``,
    put before the other scopes; ``more`` further scopes it decides, as (SQL text, allowance,
    window or None for the reservation's), put after the lead; ``columns`` what the answer returns
    of the CTE. Their parameters start at $4 and are ``args``."""

    cte: str
    lead: str
    free: int
    columns: str
    args: tuple[object, ...] = ()
    more: tuple[tuple[str, int, int | None], ...] = ()

    @property
    def sql(self) -> str:
        return _reading_sql(self.cte, (self.lead, *(m[0] for m in self.more)), self.columns)


@functools.lru_cache(maxsize=64)
def _reading_sql(cte: str, leads: tuple[str, ...], columns: str) -> str:
    """A :class:`Reading`'s statement, built once per shape (a Reading is made per attempt)."""
    return _reserve_sql(f"(ARRAY[{', '.join(leads)}]::text[] || $1::text[])", read=cte, columns=columns)


# Every statement that writes several scopes locks their rows in the order of their names (the
# upsert inserts in that order; updates lock first), so two of them never deadlock.
_LOCKED = "locked AS (SELECT scope FROM throttles WHERE scope = ANY($1::text[]) ORDER BY scope FOR UPDATE)"
# Attempts waiting in this process for a place in a scope, oldest first: a settlement here wakes the
# oldest waiter of each scope it settles at once; settlements in other replicas are seen by polling.
_waiting: dict[str, list[asyncio.Future[None]]] = {}


def _wake(scopes: list[str], places: list[int] | None = None) -> None:
    """Wake the oldest waiters of each scope: one per place given back (``places``, one each when
    None), so a coalesced settlement of n attempts lets n waiters try again, not one."""
    for k, scope in enumerate(scopes):
        waiters = _waiting.get(scope)
        left = 1 if places is None else places[k]
        while waiters and left > 0:
            future = waiters.pop(0)
            if not future.done():
                future.set_result(None)
                left -= 1
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
    wait, _ = await _reserve(conn, _RESERVE, [s for s, _ in scopes], [f for _, f in scopes], [window] * len(scopes),
                             (), busy_wait)
    return wait


async def reserve_reading(conn: asyncpg.Connection | asyncpg.Pool, reading: Reading, scopes: list[tuple[str, int]],
                          *, window: int, busy_wait: float = 10.0) -> tuple[float, asyncpg.Record]:
    """:func:`reserve` in ``reading.lead`` and ``scopes``, with ``reading`` done in the same statement
    (one round trip instead of two). Returns the wait and the answer, whose ``names`` are the scopes
    reserved (to settle) and which carries ``reading.columns``; the read is the one of the statement
    that admitted or refused the attempt."""
    frees = [reading.free, *(m[1] for m in reading.more), *(f for _, f in scopes)]
    windows = [window, *(window if m[2] is None else m[2] for m in reading.more), *([window] * len(scopes))]
    return await _reserve(conn, reading.sql, [s for s, _ in scopes], frees, windows, reading.args, busy_wait)


async def _reserve(conn: asyncpg.Connection | asyncpg.Pool, sql: str, names: list[str], frees: list[int],
                   windows: list[int], args: tuple[object, ...], busy_wait: float) -> tuple[float, asyncpg.Record]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + busy_wait
    poll = 0.05
    seconds = [float(w) for w in windows]
    while True:
        row = await conn.fetchrow(sql, names, frees, seconds, *args)
        assert row is not None
        every = list(row["names"])
        taken = list(row["taken"])
        if len(taken) == len(every):
            return 0.0, row
        if taken:  # another attempt took the last place between this statement's check and its write
            await _unpend(conn, taken)
            _wake(taken)
        if row["wait"] > 0:
            return max(float(row["wait"]), 1.0), row
        if loop.time() >= deadline:
            return 1.0, row
        await _wait_for_place(list(row["refusing"]) or every, min(poll, max(0.0, deadline - loop.time())))
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
    await _settle_many(conn, {name: (1, name == clear_scope) for name in names})


# A settlement over the rows locked in ``locked``: $1 the scopes, $2 the places each gives back, $3
# whether its failures are forgiven (the WHERE clause may be extended).
_SETTLED_ROWS = "u AS (SELECT * FROM unnest($1::text[], $2::int[], $3::bool[]) AS u(scope, n, clear))"
_SETTLE = ("UPDATE throttles t SET pending = greatest(t.pending - u.n, 0),"
           " hits = CASE WHEN u.clear THEN 0 ELSE t.hits END,"
           " blocked_until = CASE WHEN u.clear THEN NULL ELSE t.blocked_until END"
           " FROM u JOIN locked l USING (scope) WHERE t.scope = u.scope")


async def _settle_many(conn: asyncpg.Connection | asyncpg.Pool, settled: dict[str, tuple[int, bool]]) -> None:
    """Settle many successes at once: per scope, how many places are given back and whether its
    failures are forgiven."""
    names = sorted(settled)
    await conn.execute(f"WITH {_LOCKED}, {_SETTLED_ROWS} {_SETTLE}", names, [settled[n][0] for n in names],
                       [settled[n][1] for n in names])
    _wake(names, [settled[n][0] for n in names])


async def settle_if(conn: asyncpg.Connection | asyncpg.Pool, clear_scope: str, release_scopes: list[tuple[str, int]],
                    *, gated: str, gate: str, args: tuple[object, ...]) -> bool:
    """:func:`settle` and a guarded write in one statement. ``gate`` is a CTE named ``gate`` that
    writes and returns a row only when the attempt is good (its parameters start at $5 and are
    ``args``); it runs before any throttle row is locked. ``clear_scope`` and ``release_scopes`` are
    settled as by :func:`settle` either way; ``gated``, a scope this attempt reserved too, is cleared
    (failures forgiven, place given back) only when the gate wrote, and is left to the caller
    (:func:`fail` or :func:`release`) when it did not. Returns whether the gate wrote."""
    settled = {clear_scope: (1, True), gated: (1, True), **{s: (1, False) for s, _ in release_scopes}}
    names = sorted(settled)
    done = await conn.fetchval(
        f"WITH {gate}, locked AS (SELECT scope FROM throttles WHERE scope = ANY($1::text[])"
        " AND (SELECT count(*) FROM gate) >= 0 ORDER BY scope FOR UPDATE),"
        f" {_SETTLED_ROWS}, settled AS ({_SETTLE} AND (u.scope <> $4 OR EXISTS (SELECT 1 FROM gate)) RETURNING 1)"
        " SELECT count(*) FROM gate",
        names, [settled[n][0] for n in names], [settled[n][1] for n in names], gated, *args,
    )
    given = [n for n in names if done or n != gated]
    _wake(given, [settled[n][0] for n in given])
    return bool(done)


class Settler:
    """:func:`settle` for one pool, coalesced under load: a settlement goes at once when none is in
    flight; those that arrive meanwhile go together in the next statement (sign-ins from one
    address all settle its scope: one statement and one row lock for several). Each caller returns
    once its own settlement is committed, or gets the statement's error."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._queued: list[tuple[str, list[str], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def settle(self, clear_scope: str, release_scopes: list[tuple[str, int]]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # a caller cancelled meanwhile leaves no unread error behind
        self._queued.append((clear_scope, [s for s, _ in release_scopes], future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        await asyncio.shield(future)

    async def _drain(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                settled: dict[str, tuple[int, bool]] = {}
                for clear_scope, released, _ in batch:
                    for name in (clear_scope, *released):
                        n, clear = settled.get(name, (0, False))
                        settled[name] = (n + 1, clear or name == clear_scope)
                try:
                    await _settle_many(self.pool, settled)
                except Exception as exc:  # each caller gets it, as if it had settled alone
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for *_, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._task = None


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
