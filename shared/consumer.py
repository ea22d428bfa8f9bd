"""The consumer runner: at-least-once delivery made exactly-once in effect.

Rules (the same for every consumer in Hearth):

- Offsets are committed manually, only after every record before them was handled (or
  dead-lettered). A crash re-delivers from the last commit.
- Idempotency by event id: with a database, :class:`ConsumerRunner` opens a transaction, inserts
  ``(group, event_id)`` into ``processed_events`` and runs the handler on that connection; a
  redelivered event finds its row and is skipped, and the handler's writes and the marker commit or
  roll back together. Without a database (cache holders) handlers must be naturally idempotent.
- A failing handler is retried with exponential backoff a bounded number of times, then the record
  is published to the group's dead-letter topic with the error in its headers and the runner moves
  on; a record that cannot even be decoded goes there at once. One poison message never stops the
  events behind it.
- Shutdown finishes the batch in hand, commits, and leaves the group.
- Handlers are coroutines: nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import Counter, Histogram

from shared import logs
from shared.events import Envelope, dead_letter_topic

log = logging.getLogger(__name__)

CONSUMED = Counter("hearth_events_consumed_total", "Events handled", ["group", "type", "outcome"])
HANDLE_SECONDS = Histogram(
    "hearth_event_handle_seconds",
    "Handler time per event",
    ["group"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
EVENT_AGE = Histogram(
    "hearth_event_age_seconds",
    "Time from event occurrence to handling",
    ["group"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)

DbHandler = Callable[[asyncpg.Connection, Envelope], Awaitable[None]]
PlainHandler = Callable[[Envelope], Awaitable[None]]
PartitionsCallback = Callable[[set[TopicPartition]], Awaitable[None]]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ConsumerRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runner._commit()
        if self.runner.on_revoked:
            await self.runner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.runner.on_assigned:
            await self.runner.on_assigned(set(assigned))


class ConsumerRunner:
    """Consumes ``topics`` in ``group`` and applies ``handler`` to each decoded envelope.

    Give ``pool`` and a :data:`DbHandler` for transactional idempotency, or no pool and a
    :data:`PlainHandler`. ``types`` filters by event type (others are committed and skipped).
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        group: str,
        topics: Sequence[str],
        handler: DbHandler | PlainHandler,
        producer: AIOKafkaProducer,
        pool: asyncpg.Pool | None = None,
        types: Sequence[str] | None = None,
        max_attempts: int = 5,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        max_records: int = 500,
        auto_offset_reset: str = "earliest",
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
    ) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.topics = list(topics)
        self.handler = handler
        self.producer = producer
        self.pool = pool
        self.types = set(types) if types else None
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_records = max_records
        self.auto_offset_reset = auto_offset_reset
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.consumer: AIOKafkaConsumer | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.started = asyncio.Event()

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            max_poll_interval_ms=300_000,
            metadata_max_age_ms=60_000,
        )
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        for i in range(60):
            try:
                await self.consumer.start()
                break
            except Exception:
                if i == 59:
                    raise
                await asyncio.sleep(0.5)
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.group}")

    async def stop(self) -> None:
        """Finish the batch in hand, commit, leave the group."""
        self._stopping = True
        if self._task:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 30)
        if self.consumer:
            with contextlib.suppress(Exception):
                await self._commit()
            await self.consumer.stop()

    async def _commit(self) -> None:
        if self.consumer and self._pending:
            offsets, self._pending = self._pending, {}
            try:
                await self.consumer.commit(offsets)
            except Exception:
                # Partitions moved to another member: it will redeliver; idempotency absorbs it.
                log.warning("offset commit failed", exc_info=True)

    async def _run(self) -> None:
        assert self.consumer is not None
        while not self._stopping:
            try:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=self.max_records)
            except Exception:
                log.exception("consumer poll failed", extra={"group": self.group})
                await asyncio.sleep(1)
                continue
            self.started.set()  # joined the group and polled once
            for tp, records in batches.items():
                for record in records:
                    await self._handle_record(record)
                    self._pending[tp] = record.offset + 1
            if batches:
                await self._commit()

    async def _handle_record(self, record: ConsumerRecord[Any, Any]) -> None:
        try:
            env = Envelope.decode(record.value)
        except ValueError as exc:
            CONSUMED.labels(self.group, "malformed", "dead_letter").inc()
            await self._dead_letter(record, f"decode: {exc}", attempts=0)
            return
        if self.types is not None and env.type not in self.types:
            CONSUMED.labels(self.group, env.type, "skipped").inc()
            return
        token = logs.event_id.set(str(env.id))
        try:
            EVENT_AGE.labels(self.group).observe(max(0.0, time.time() - env.occurred_at.timestamp()))
            last_error = ""
            for attempt in range(1, self.max_attempts + 1):
                started = time.perf_counter()
                try:
                    outcome = await self._apply(env)
                    HANDLE_SECONDS.labels(self.group).observe(time.perf_counter() - started)
                    CONSUMED.labels(self.group, env.type, outcome).inc()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "event handler failed",
                        extra={"group": self.group, "type": env.type, "attempt": attempt, "error": last_error},
                    )
                    if attempt < self.max_attempts:
                        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
                        await asyncio.sleep(delay * (0.5 + random.random() / 2))
            CONSUMED.labels(self.group, env.type, "dead_letter").inc()
            await self._dead_letter(record, last_error, attempts=self.max_attempts)
        finally:
            logs.event_id.reset(token)

    async def _apply(self, env: Envelope) -> str:
        if self.pool is None:
            await self.handler(env)  # type: ignore[call-arg, arg-type]
            return "handled"
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                self.group,
                env.id,
            )
            if not fresh:
                return "duplicate"
            await self.handler(conn, env)  # type: ignore[call-arg, arg-type]
            return "handled"

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], reason: str, *, attempts: int) -> None:
        headers = list(record.headers or []) + [
            ("dlq_reason", reason[:1000].encode()),
            ("dlq_source_topic", record.topic.encode()),
            ("dlq_source_partition", str(record.partition).encode()),
            ("dlq_source_offset", str(record.offset).encode()),
            ("dlq_attempts", str(attempts).encode()),
            ("dlq_group", self.group.encode()),
        ]
        log.error("event dead-lettered", extra={"group": self.group, "reason": reason[:200]})
        # Keep trying: committing past a record that is in neither place would lose it.
        while True:
            try:
                await self.producer.send_and_wait(
                    dead_letter_topic(self.group), record.value, key=record.key, headers=headers
                )
                return
            except Exception:
                log.exception("dead-letter publish failed; retrying")
                await asyncio.sleep(1)
