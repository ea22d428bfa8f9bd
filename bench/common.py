"""What every benchmark module shares: the result row and small measuring helpers.

A benchmark module in ``bench/`` defines ``NAME`` and ``async def run(stack) -> list[Row]``, where
``stack`` is a started :class:`deploy.launcher.Stack` (services, holders and edge up). Register it
in ``bench/__main__.py``'s ``MODULES``.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class Row:
    benchmark: str
    metric: str
    value: float
    unit: str
    reference: str = ""
    reference_value: float | None = None
    goal: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference_value in (None, 0):
            return None
        return self.value / self.reference_value  # type: ignore[operator]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else float("nan"),
        "mean": statistics.fmean(ms) if ms else float("nan"),
    }


def table(rows: list[Row]) -> str:
    head = ("benchmark", "metric", "value", "unit", "reference (same run)", "ref value", "ratio", "goal")
    body = []
    for r in rows:
        body.append((
            r.benchmark, r.metric, f"{r.value:,.2f}", r.unit, r.reference,
            "" if r.reference_value is None else f"{r.reference_value:,.2f}",
            "" if r.ratio is None else f"{r.ratio:.2f}", r.goal,
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])


# ---------------------------------------------------------------------------------------------
# Shared measuring helpers
# ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def bare_server() -> AsyncIterator[str]:
    """Run bench.bare in its own process (as the services run) and yield its URL."""
    from deploy.launcher import ROOT, free_port, port_open

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare", str(port)], cwd=ROOT)
    try:
        for _ in range(100):
            if port_open(port):
                break
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


async def closed_loop(make: Callable[[aiohttp.ClientSession, int], Awaitable[bool]], *, concurrency: int,
                      seconds: float) -> tuple[float, list[float]]:
    """Run ``make`` from ``concurrency`` workers for ``seconds``; returns (successes/s, latencies)."""
    latencies: list[float] = []
    ok = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker(w: int) -> None:
            nonlocal ok
            i = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if await make(http, w * 1_000_000 + i):
                    ok += 1
                latencies.append(time.perf_counter() - t0)
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    return ok / elapsed, latencies


async def broker_round_trip(bootstrap: str, samples: int = 200) -> list[float]:
    """The broker's own produce (acks=all) -> consume latency, on a fresh topic."""
    import uuid

    from aiokafka import AIOKafkaConsumer

    from shared import kafka

    topic = f"bench.ref-{uuid.uuid4().hex[:8]}"
    await kafka.ensure_topics(bootstrap, [topic], partitions=1)
    producer = kafka.make_producer(bootstrap)
    await producer.start()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                group_id=f"bench-ref-{uuid.uuid4().hex[:6]}", fetch_max_wait_ms=10)
    await consumer.start()
    await asyncio.sleep(1.0)
    sent: dict[bytes, float] = {}
    got: list[float] = []

    async def receive() -> None:
        async for rec in consumer:
            t0 = sent.get(rec.key or b"")
            if t0 is not None:
                got.append(time.perf_counter() - t0)
                if len(got) >= samples:
                    return

    task = asyncio.create_task(receive())
    for i in range(samples):
        key = f"ref-{i}".encode()
        sent[key] = time.perf_counter()
        await producer.send_and_wait(topic, b"{}", key=key)
        await asyncio.sleep(0.002)
    await asyncio.wait_for(task, 60)
    await consumer.stop()
    await producer.stop()
    return got


def service_db(stack: object, service: str) -> str:
    from shared.settings import with_database

    prefix = stack.extra_env.get("DB_NAME_PREFIX", "")  # type: ignore[attr-defined]
    return with_database(stack.database_url, f"{prefix}hearth_{service}")  # type: ignore[attr-defined]
