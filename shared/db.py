"""The asyncpg pool and the forward-only SQL migration runner.

Migrations are plain ``NNNN_name.sql`` files. The shared ones (outbox, processed events) are applied
first under the ``shared/`` namespace, then the service's own. A session advisory lock serialises
concurrent starts of several replicas, and ``schema_migrations`` records what ran, so each file runs
once per database, each in its own transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

log = logging.getLogger(__name__)

SHARED_MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_ID = 0x4E4152_7448  # arbitrary, fixed: "migrations" lock for this database


async def init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default reset query (UNLISTEN, RESET ALL, CLOSE ALL, advisory
    unlock: one more round trip per use). Pooled connections carry no session state here: no SET,
    LISTEN or cursors, and the one session advisory lock (migrations) is released in ``finally``;
    LISTEN and the relay's lock live on dedicated connections. asyncpg still rolls back an open
    transaction before calling this."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10,
                      server_settings: dict[str, str] | None = None) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init_connection, command_timeout=60, reset=_keep_session,
        server_settings=server_settings,
    )
    assert pool is not None
    return pool


async def ensure_database(dsn: str) -> None:
    """Create the database named in ``dsn`` if it does not exist (connects to ``postgres``)."""
    from urllib.parse import urlsplit

    from shared.settings import with_database

    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                pass  # a sibling replica created it at the same moment (pg_database's unique index)
    finally:
        await conn.close()


def _files(directory: Path, namespace: str) -> list[tuple[str, Path]]:
    if not directory.is_dir():
        return []
    return [(f"{namespace}/{p.stem}", p) for p in sorted(directory.glob("*.sql"))]


async def migrate(pool: asyncpg.Pool, service_dirs: Sequence[tuple[str, Path]]) -> list[str]:
    """Apply pending migrations; returns the versions applied now. Safe to run concurrently."""
    plan = _files(SHARED_MIGRATIONS, "shared")
    for namespace, directory in service_dirs:
        plan += _files(directory, namespace)
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, path in plan:
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied_now.append(version)
                log.info("migration applied", extra={"version": version})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now


Record = dict[str, Any]
