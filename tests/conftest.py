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
import contextlib
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

from deploy.launcher import Stack, remove_run_dir  # noqa: E402
from shared import db  # noqa: E402
from shared.settings import with_database  # noqa: E402

RUN_ID = uuid.uuid4().hex[:8]
_REAL = {"stack", "stack_obj", "infra", "scratch_db", "topic", "tap", "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for none of the real-server fixtures is a unit test (``make test-unit``)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if not names & _REAL and item.get_closest_marker("stack") is None:
            item.add_marker(pytest.mark.unit)
TEST_HOLDERS = ("alpha", "beta", "gamma")


@dataclass
class Infra:
    database_url: str
    kafka_bootstrap: str
    topic_prefix: str
    run_dir: Path


def _containers_infra() -> tuple[str, str, list[object]]:
    """Kafka and PostgreSQL from Hearth's own images (``make images``), started by testcontainers on
    the host network on free ports; Ryuk is disabled and ``stack_obj`` removes them."""
    from deploy.launcher import free_port
    from hearth_testing import containers as tc

    started: list[object] = []
    try:
        pg, url = tc.start_postgres(RUN_ID, free_port(), password=secrets.token_urlsafe(16))
        started.append(pg)
        kafka, bootstrap = tc.start_kafka(RUN_ID, free_port(), free_port())
        started.append(kafka)
    except BaseException:
        tc.stop_all(started)
        tc.remove_labelled(RUN_ID)
        raise
    return url, bootstrap, started


@pytest.fixture(scope="session")
def stack_obj(request: pytest.FixtureRequest) -> Iterator[Stack]:
    run_dir = ROOT / ".run" / f"test-{RUN_ID}"
    containers: list[object] = []
    extra: dict[str, str] = {}
    if os.environ.get("HEARTH_INFRA") == "containers":
        url, bootstrap, containers = _containers_infra()
        os.environ["DATABASE_URL"] = url
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    prefix = f"t{RUN_ID}."
    # Test databases: hearth_<service> would clash between runs sharing a server, so prefix them.
    stack = Stack(
        run_dir,
        console=False,
        fixed_ports=False,
        holders=TEST_HOLDERS,
        topic_prefix=prefix,
        fast_db=True,
        # Every fan-out test runs against two instances of each holder (issue 17).
        holder_instances=2,
        public_host="localhost",  # WebAuthn (passkey tests) needs a domain as relying-party id
        extra_env={
            **extra,
            "DB_NAME_PREFIX": f"t{RUN_ID}_",
            "ARGON2_MEMORY_KIB": "19456",
            # Every edge request comes from 127.0.0.1: per-address limits sized for a whole suite.
            "SIGNIN_FREE_FAILURES_PER_ADDRESS": "50",
            "RESET_REQUESTS_PER_ADDRESS": "1000",
            "CREATE_PER_ADDRESS": "100000",
            "CREATE_PER_CLIENT": "1000",
            # Short enough that a test can watch an exhausted code budget come back.
            "CODE_ATTEMPT_WINDOW": "6",
            # Per-address budgets (issue 16): sized for a whole suite signing up from 127.0.0.1;
            # tests/security checks them from other loopback addresses.
            "SIGNUPS_PER_ADDRESS": "200",
            "CODE_ATTEMPTS_PER_ADDRESS": "12",
            "LOG_LEVEL": "INFO",
        },
    )
    try:
        stack.start_infra()
    except BaseException:
        if containers:
            from hearth_testing import containers as tc

            tc.stop_all(containers)
        raise
    try:
        yield stack
    finally:
        stack.stop()
        if containers:
            from hearth_testing import containers as tc

            tc.stop_all(containers)
            tc.remove_labelled(RUN_ID)
        if request.session.testsfailed:
            _keep_logs(run_dir)
        if os.environ.get("HEARTH_KEEP_TEST_RUN") != "1":
            remove_run_dir(run_dir)


def _keep_logs(run_dir: Path) -> None:
    """A run with failures keeps every process's log in artifacts/test-logs/<run>/ (the run directory
    itself is removed), so a failure seen once in CI can be read afterwards."""
    target = ROOT / "artifacts" / "test-logs" / run_dir.name
    with contextlib.suppress(OSError):
        shutil.copytree(run_dir / "logs", target, dirs_exist_ok=True)
        print(f"\nlogs of this failed run: {target}")


@pytest.fixture(scope="session")
def infra(stack_obj: Stack) -> Infra:
    return Infra(stack_obj.database_url, stack_obj.kafka_bootstrap, stack_obj.topic_prefix, stack_obj.run_dir)


_stack_started = False
START_LOGS: dict[str, bytes] = {}


@pytest.fixture(scope="session")
def stack(stack_obj: Stack) -> Stack:
    """The whole stack: SMTP sink, services, sample holders, nginx. Started once per session."""
    global _stack_started
    if not _stack_started:
        stack_obj.start_rest()
        _stack_started = True
        # What every process logged while starting (readiness includes the consumers' assignment):
        # tests/newuser checks that a clean start logged no ERROR.
        START_LOGS.update({p.name: p.read_bytes() for p in (stack_obj.run_dir / "logs").glob("*.log")})
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


async def edge_json(stack: Stack, method: str, path: str, **kw):  # type: ignore[no-untyped-def]
    """Call the edge with Accept: application/json; returns (status, body or None, headers)."""
    import aiohttp

    headers = {"Accept": "application/json", "X-Plex-Client-Identifier": "tests", **kw.pop("headers", {})}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, stack.edge_url + path, headers=headers, **kw) as r:
            body = await r.json(content_type=None) if (await r.read()) else None
            return r.status, body, r.headers


class EventTap:
    """Collects every event of some topics from the beginning, in the background."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        from aiokafka import AIOKafkaConsumer

        self.consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                         group_id=f"tap-{uuid.uuid4().hex[:8]}")
        self.events: list = []  # type: ignore[type-arg]
        self.task: asyncio.Task | None = None  # type: ignore[type-arg]

    async def start(self) -> None:
        from shared.events import Envelope

        await self.consumer.start()

        async def run() -> None:
            async for rec in self.consumer:
                try:
                    self.events.append(Envelope.decode(rec.value))
                except ValueError:
                    pass

        self.task = asyncio.create_task(run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        await self.consumer.stop()

    def of(self, type_: str, **match: object) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if e.type == type_ and all(e.data.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="session")
async def tap(stack: Stack):  # type: ignore[no-untyped-def]
    from shared.events import AUTH_EVENTS, DEVICESESSION_EVENTS, LINKCODE_EVENTS, SESSIONS_REVOKED

    t = EventTap(stack.kafka_bootstrap, [stack.topic_prefix + x for x in
                                         (AUTH_EVENTS, SESSIONS_REVOKED, DEVICESESSION_EVENTS, LINKCODE_EVENTS)])
    await t.start()
    yield t
    await t.stop()


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
