"""Transactional outbox: write events with state changes, and the relay that publishes them.

Writing: :func:`add` / :func:`add_many` insert into ``outbox`` on the caller's connection, inside
the caller's transaction. A rolled-back change therefore publishes nothing, and a committed one
always has its event row.

Relaying: :class:`OutboxRelay` claims unpublished rows in id order with ``FOR UPDATE SKIP LOCKED``,
sends them all, waits for every broker acknowledgement, then stamps ``published_at`` in the same
transaction. If Kafka is down, the send fails, the transaction rolls back, and the rows are retried
with backoff: no committed event is lost. The relay wakes on ``LISTEN outbox`` (a statement trigger
notifies on insert) and polls as a fallback.

Per-key order: only one relay per database publishes at a time (a session advisory lock held on
a dedicated connection; other replicas poll for it every ``poll_interval`` seconds, and when the
leader dies its connection closes, PostgreSQL releases the lock and a standby takes over within
about a second), rows are sent in id order by one idempotent producer,
and a batch is stamped only when all of it was acknowledged. A crash between the broker's ack and
the stamp re-sends the batch: delivery is at-least-once and consumers deduplicate by event id.

Housekeeping: the leader also purges, once a minute, published rows older than
``retention_seconds`` and ``processed_events`` markers older than ``processed_retention`` (which
must outlast the topics' retention, or a redelivered event would no longer be recognised), in
batches so no purge holds locks for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import asyncpg
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge, Histogram

from shared.events import Envelope

log = logging.getLogger(__name__)

_RELAY_LOCK = 0x0B0C5  # session advisory lock: one active relay per database

OUTBOX_PUBLISHED = Counter("hearth_outbox_published_total", "Outbox rows published", ["service"])
OUTBOX_FAILURES = Counter("hearth_outbox_publish_failures_total", "Failed outbox batches", ["service"])
OUTBOX_LAG = Histogram(
    "hearth_outbox_lag_seconds",
    "Time from outbox insert to broker acknowledgement",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OUTBOX_PENDING = Gauge("hearth_outbox_pending", "Unpublished outbox rows seen by the relay", ["service"])
RELAY_ACTIVE = Gauge("hearth_outbox_relay_active", "1 while this replica's relay holds the lock and publishes",
                     ["service"])


async def add(conn: asyncpg.Connection, topic: str, env: Envelope) -> None:
    """Insert one event; must run inside the transaction that makes the state change."""
    await conn.execute(
        "INSERT INTO outbox (event_id, topic, key, event_type, payload) VALUES ($1, $2, $3, $4, $5)",
        env.id,
        topic,
        env.key,
        env.type,
        env.encode(),
    )


async def add_many(conn: asyncpg.Connection, topic: str, envs: Iterable[Envelope]) -> int:
    """Insert many events in one statement (set-based; for batch jobs)."""
    rows = [(e.id, topic, e.key, e.type, e.encode()) for e in envs]
    if not rows:
        return 0
    await conn.execute(
        "INSERT INTO outbox (event_id, topic, key, event_type, payload)"
        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[])",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
    )
    return len(rows)


class OutboxRelay:
    """Publishes outbox rows to Kafka. Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        *,
        service: str,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        retention_seconds: float = 24 * 3600,
        processed_retention: float = 8 * 24 * 3600,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.producer = producer
        self.service = service
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention_seconds = retention_seconds
        self.processed_retention = processed_retention
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.active = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.service}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping:
            try:
                await self._lead()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; restarting")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _lead(self) -> None:
        """Hold the relay lock on a dedicated connection (that also LISTENs), then publish."""
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK):
                self.active = False
                await asyncio.sleep(self.poll_interval)
            self.active = True
            RELAY_ACTIVE.labels(self.service).set(1)
            log.info("outbox relay leading", extra={"service": self.service})
            await conn.add_listener("outbox", lambda *_: self._wake.set())
            last_purge = 0.0
            while not self._stopping:
                # Cleared before the batch is read, so a NOTIFY for a row committed while this batch
                # is in flight wakes the wait below at once (cleared after, it was lost, and that row
                # waited for the next commit or the poll).
                self._wake.clear()
                published = await self.publish_batch()
                if published >= self.batch_size:
                    continue  # more waiting: no sleep
                if time.monotonic() - last_purge > 60:
                    await self._purge()
                    last_purge = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        finally:
            self.active = False
            RELAY_ACTIVE.labels(self.service).set(0)
            with contextlib.suppress(Exception):
                await conn.close()

    async def publish_batch(self) -> int:
        """Publish one batch; returns how many rows were published. Raises if Kafka fails."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, topic, key, event_type, event_id, payload, created_at FROM outbox"
                " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self.batch_size,
            )
            if not rows:
                OUTBOX_PENDING.labels(self.service).set(0)
                return 0
            OUTBOX_PENDING.labels(self.service).set(len(rows))
            try:
                futures = [
                    await self.producer.send(
                        r["topic"],
                        bytes(r["payload"]),
                        key=r["key"].encode(),
                        headers=[
                            ("event_type", r["event_type"].encode()),
                            ("event_id", str(r["event_id"]).encode()),
                            ("content-type", b"application/json"),
                        ],
                    )
                    for r in rows
                ]
                await asyncio.gather(*futures)
            except Exception:
                OUTBOX_FAILURES.labels(self.service).inc()
                raise
            # The stamp commits asynchronously: a crash that loses it re-sends the batch, which
            # at-least-once delivery already allows (consumers deduplicate by event id), and the
            # next batch does not wait for this one's WAL flush.
            await conn.execute("SET LOCAL synchronous_commit = off")
            await conn.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
            now = time.time()
            for r in rows:
                OUTBOX_LAG.labels(self.service).observe(max(0.0, now - r["created_at"].timestamp()))
            OUTBOX_PUBLISHED.labels(self.service).inc(len(rows))
            return len(rows)

    async def _purge(self) -> int:
        """Delete old published rows and processed-event markers; returns how many went."""
        gone = 0
        for sql, keep in (
            ("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE published_at"
             " < now() - make_interval(secs => $1) LIMIT 10000)", self.retention_seconds),
            ("DELETE FROM processed_events WHERE ctid IN (SELECT ctid FROM processed_events WHERE processed_at"
             " < now() - make_interval(secs => $1) LIMIT 10000)", self.processed_retention),
        ):
            while True:
                async with self.pool.acquire() as conn:
                    n = int((await conn.execute(sql, keep)).split()[-1])
                gone += n
                if n < 10000:
                    break
        return gone
