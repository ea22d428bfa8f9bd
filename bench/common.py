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


def _label(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return None
    text = b" ".join(argv).decode(errors="replace")
    if text.startswith("postgres:"):  # a backend: "postgres: USER DB ADDRESS STATE" or a worker's title
        words = text.split()
        if "autovacuum" in text:
            return "postgres autovacuum"
        if len(words) >= 3 and "(" in text:
            return f"postgres {words[2]}"
        return "postgres background"
    if "/postgresql/" in text:
        return "postgres"
    if "java" in argv[0].decode(errors="replace"):
        return "kafka"
    if "nginx" in text:
        return "nginx"
    if "services.cli admin" in text:
        return "admin command"
    for name in ("auth", "devicesession", "linkcode", "notification", "web"):
        if f"services.{name}" in text:
            return name
    if " holder " in text or "services.holder" in text:
        return "holders"
    if "smtp_sink" in text:
        return "smtp sink"
    if "-m bench" in text:
        return "bench (load)"
    return None


def _cpu_ticks() -> dict[tuple[str, str], int]:
    import os

    out: dict[tuple[str, str], int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        label = _label(pid)
        if label is None:
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[(label, pid)] = int(fields[11]) + int(fields[12])  # utime + stime
    return out


class CpuMeter:
    """CPU seconds used per kind of process (services, holders, postgres, kafka, ...) between
    ``start()`` and ``stop()``, read from /proc; processes that start in between count from zero."""

    def __init__(self) -> None:
        self.before: dict[tuple[str, str], int] = {}
        self.last: dict[tuple[str, str], int] = {}
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        self.before = _cpu_ticks()

    def sample(self) -> None:
        """Call now and then for short-lived processes (a command) so their last reading counts."""
        for key, ticks in _cpu_ticks().items():
            self.last[key] = ticks

    def resume(self) -> None:
        """Count again from now (after :meth:`pause`), adding to what was counted before."""
        self.before = _cpu_ticks()
        self.last = {}

    def pause(self) -> dict[str, float]:
        """Stop counting for now; ``seconds`` holds the totals of every counted stretch."""
        earlier = self.seconds
        self.stop()
        for label, value in earlier.items():
            self.seconds[label] = self.seconds.get(label, 0.0) + value
        self.seconds = dict(sorted(self.seconds.items(), key=lambda kv: -kv[1]))
        return self.seconds

    def stop(self) -> dict[str, float]:
        import os

        hz = os.sysconf("SC_CLK_TCK")
        after = {**self.last, **_cpu_ticks()}
        totals: dict[str, float] = {}
        for key, ticks in after.items():
            totals[key[0]] = totals.get(key[0], 0.0) + (ticks - self.before.get(key, 0)) / hz
        self.seconds = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
        return self.seconds


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client for load generation, so that the generator takes as
    little as possible of the 2 cores it measures: one connection, one request at a time, requests
    prepared as bytes, responses with Content-Length or chunked bodies."""

    def __init__(self, base_url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def prepare(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def raw_closed_loop(base_url: str, requests: list[bytes], *, expect: int, concurrency: int,
                          seconds: float) -> float:
    """Closed loop over :class:`RawHttp` connections, cycling through prepared ``requests``;
    returns answers with status ``expect`` per second."""
    ok = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal ok
        client = RawHttp(base_url)
        i = w
        try:
            while time.perf_counter() < deadline:
                status, _ = await client.send(requests[i % len(requests)])
                ok += status == expect
                i += concurrency
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ok / (time.perf_counter() - started)


async def histogram_totals(base_url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram on a service's /metrics (0, 0 before any observation)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as r:
        text = await r.text()
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                for part in totals:
                    if sample.name == f"{name}_{part}":
                        totals[part] += sample.value
    return totals["sum"], totals["count"]
