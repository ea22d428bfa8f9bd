"""Test fixtures: real PostgreSQL, real Apache Kafka, and (for end-to-end tests) the whole stack.

One infrastructure per test session, started by the project's launcher in a throw-away directory
on free ports (or reused from ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS``; or, with
``HEARTH_INFRA=containers`` and a Docker engine, from testcontainers). Every run uses its own topic
prefix and database names, so runs never see each other's data.

The ``stack`` fixture starts the SMTP sink, every service, sample holders and nginx once per session
on top of that infrastructure; tests isolate themselves with fresh accounts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.launcher import Stack  # noqa: E402
from shared import db  # noqa: E402
from shared.settings import with_database  # noqa: E402

RUN_ID = uuid.uuid4().hex[:8]
TEST_HOLDERS = ("alpha", "beta", "gamma")


@dataclass
class Infra:
    database_url: str
    kafka_bootstrap: str
    topic_prefix: str
    run_dir: Path


def _containers_infra() -> tuple[str, str, list[object]]:
    """Kafka and PostgreSQL from testcontainers (needs a Docker engine; not used on CI)."""
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    pg = PostgresContainer("postgres:16-alpine", driver=None)
    kafka = KafkaContainer("apache/kafka:4.1.1").with_kraft()
    pg.start()
    kafka.start()
    return pg.get_connection_url(), kafka.get_bootstrap_server(), [pg, kafka]


@pytest.fixture(scope="session")
def stack_obj() -> Iterator[Stack]:
    run_dir = ROOT / ".run" / f"test-{RUN_ID}"
    containers: list[object] = []
    extra: dict[str, str] = {}
    if os.environ.get("HEARTH_INFRA") == "containers":
        url, bootstrap, containers = _containers_infra()
        os.environ.setdefault("DATABASE_URL", url)
        os.environ.setdefault("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    prefix = f"t{RUN_ID}."
    # Test databases: hearth_<service> would clash between runs sharing a server, so prefix them.
    stack = Stack(
        run_dir,
        console=False,
        fixed_ports=False,
        holders=TEST_HOLDERS if (ROOT / "services" / "holder" / "cli.py").exists() else (),
        topic_prefix=prefix,
        fast_db=True,
        extra_env={
            **extra,
            "DB_NAME_PREFIX": f"t{RUN_ID}_",
            "ARGON2_MEMORY_KIB": "19456",
            "LOG_LEVEL": "INFO",
        },
    )
    stack.start_infra()
    try:
        yield stack
    finally:
        stack.stop()
        for c in containers:
            c.stop()  # type: ignore[attr-defined]
        if os.environ.get("HEARTH_KEEP_TEST_RUN") != "1":
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def infra(stack_obj: Stack) -> Infra:
    return Infra(stack_obj.database_url, stack_obj.kafka_bootstrap, stack_obj.topic_prefix, stack_obj.run_dir)


_stack_started = False


@pytest.fixture(scope="session")
def stack(stack_obj: Stack) -> Stack:
    """The whole stack: SMTP sink, services, sample holders, nginx. Started once per session."""
    global _stack_started
    if not _stack_started:
        stack_obj.start_rest()
        _stack_started = True
    return stack_obj


@pytest.fixture
def topic(infra: Infra) -> str:
    """A fresh topic name for a test that needs isolation."""
    return f"{infra.topic_prefix}test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def scratch_db(infra: Infra) -> AsyncIterator[str]:
    """A fresh database with the shared migrations applied; dropped after the test."""
    name = f"t{RUN_ID}_scratch_{secrets.token_hex(4)}"
    url = with_database(infra.database_url, name)
    await db.ensure_database(url)
    pool = await db.create_pool(url, max_size=2)
    await db.migrate(pool, [])
    await pool.close()
    yield url
    conn = await asyncpg.connect(with_database(infra.database_url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def eventually(check, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``check`` (sync or async) until it returns a truthy value; return that value."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")
        await asyncio.sleep(interval)
