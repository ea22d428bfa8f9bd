"""The consume loop (one for all of Hearth) and the consumer runner built on it.

:class:`ConsumeLoop` is the only place in Hearth that polls Kafka. It has two modes:

- **Group mode** (``group="..."``): the replicas of one service share the partitions of a consumer
  group; offsets are committed manually, only after every record before them was handed to the
  handler, and on a rebalance the loop commits what it finished before it lets partitions go. A
  crash re-delivers from the last commit. Used by :class:`ConsumerRunner` (every service's event
  consumers).
- **Broadcast mode** (``group=None``): this process reads **every** partition of its topics itself,
  with no consumer group at all (manual assignment), starting at the end (or the beginning). Used by
  the holder kit (every instance of every holder must see every revocation) and by ``hearth
  fanout``. The loop vouches for continuity: it calls ``on_reset(reason)`` whenever it cannot rule
  out having missed a record (at start once positioned, when the next record of a partition is not
  the one after the last, when a position fell out of the retained log, when partitions were added,
  when polling failed, and when no fetch answer arrived for ``max_staleness`` seconds), and
  :attr:`ConsumeLoop.fresh` says whether it can vouch right now.

Why broadcast mode has no group (rather than one group per instance): a group per instance needs a
stable instance id *and* a way to delete the groups (and committed offsets) of instances that died,
or a Deployment leaves one orphan group per pod ever started; and what it would buy (resuming from a
committed offset) is worthless to a cache holder, whose safety rule is to start with an empty cache
and only need revocations published after it started. Manual assignment needs no coordinator, has
no rebalances (a sibling starting or dying never pauses this one), and leaves nothing behind.

:class:`ConsumerRunner` rules (the same for every service consumer in Hearth):

- Idempotency by event id: with a database, the runner opens a transaction, inserts
  ``(group, event_id)`` into ``processed_events`` and runs the handler on that connection; a
  redelivered event finds its row and is skipped, and the handler's writes and the marker commit or
  roll back together. The records one poll brought of a partition share that transaction (in
  order, up to ``BATCH``), so a burst costs one commit; if any of them fails, the batch is rolled
  back and its records are applied one per transaction. Without a database (cache holders)
  handlers must be naturally idempotent.
- A failing handler is retried with exponential backoff a bounded number of times, then the record
  is published to the group's dead-letter topic with the error in its headers and the runner moves
  on; a record that cannot even be decoded goes there at once. One poison message never stops the
  events behind it. An unreachable database (a restart, a failover) is not the record's fault: such
  failures are retried without limit and never dead-letter an event.
- Shutdown finishes the batch in hand, commits, and leaves the group.
- Handlers are coroutines: nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import OffsetOutOfRangeError
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
LOOP_RESETS = Counter("hearth_consume_loop_resets_total", "Broadcast loops that could not vouch for continuity",
                      ["loop", "reason"])

DbHandler = Callable[[asyncpg.Connection, Envelope], Awaitable[None]]
PlainHandler = Callable[[Envelope], Awaitable[None]]
PartitionsCallback = Callable[[set[TopicPartition]], Awaitable[None]]
RecordsHandler = Callable[[TopicPartition, list[ConsumerRecord[Any, Any]]], Awaitable[None]]
ResetCallback = Callable[[str], Awaitable[None] | None]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: ConsumeLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.loop.commit()
        if self.loop.on_revoked:
            await self.loop.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.loop.on_assigned:
            await self.loop.on_assigned(set(assigned))


class ConsumeLoop:
    """Polls ``topics`` and hands each partition's records, in offset order, to ``on_records``.

    ``group`` set: group mode (shared partitions, manual commits). ``group=None``: broadcast mode
    (every partition, no group; ``start`` is ``"latest"`` or ``"earliest"``). See the module docstring.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Sequence[str],
        on_records: RecordsHandler,
        group: str | None = None,
        name: str | None = None,
        start: str = "latest",
        on_reset: ResetCallback | None = None,
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        fetch_max_wait_ms: int = 500,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        metadata_max_age_ms: int = 60_000,
        max_staleness: float = 5.0,
        client_id: str = "hearth",
    ) -> None:
        if start not in ("latest", "earliest"):
            raise ValueError("start must be 'latest' or 'earliest'")
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.on_records = on_records
        self.group = group
        self.name = name or group or "broadcast"
        self.start_at = start
        self.on_reset = on_reset
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.metadata_max_age_ms = metadata_max_age_ms
        self.max_staleness = max_staleness
        self.client_id = client_id
        self.consumer: AIOKafkaConsumer | None = None
        self.started = asyncio.Event()  # group mode: joined and polled once; broadcast: positioned
        self._fresh = False
        self._fresh_checked = 0.0
        self._fresh_cached = False
        self._pending: dict[TopicPartition, int] = {}
        self._expected: dict[TopicPartition, int] = {}
        self._positioned_ms: dict[TopicPartition, float] = {}
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.resets: list[str] = []  # reasons, for tests

    @property
    def broadcast(self) -> bool:
        return self.group is None

    @property
    def fresh(self) -> bool:
        """Broadcast mode: positioned, and every partition heard from (positioning, then fetches)
        within ``max_staleness``."""
        if not self._fresh or self.consumer is None:
            return False
        now = time.monotonic()
        if now - self._fresh_checked > 0.1:  # validate() asks on every call: look at most 10 times a second
            self._fresh_checked = now
            self._fresh_cached = self._stale_partitions() == []
        return self._fresh_cached

    def _stale_partitions(self) -> list[TopicPartition]:
        assert self.consumer is not None
        now_ms = time.time() * 1000
        stale = []
        for tp in self._expected:
            # Positioning read each partition's end from its leader: that counts as hearing from it,
            # so a new instance uses its cache at once instead of after its first (long) fetch.
            heard = [t for t in (self.consumer.last_poll_timestamp(tp), self._positioned_ms.get(tp)) if t]
            ts = max(heard) if heard else None
            if ts is None or now_ms - ts > self.max_staleness * 1000:
                stale.append(tp)
        return stale

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consume-{self.name}")

    async def stop(self, *, wait: float = 30.0) -> None:
        """Finish the batch in hand (waiting at most ``wait`` seconds), commit (group mode), leave."""
        self._stopping = True
        if self._task:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), wait)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task

    async def commit(self) -> None:
        if self.consumer is not None and self._pending and not self.broadcast:
            offsets, self._pending = self._pending, {}
            try:
                await self.consumer.commit(offsets)
            except Exception:
                # Partitions moved to another member: it will redeliver; idempotency absorbs it.
                log.warning("offset commit failed", exc_info=True, extra={"group": self.group})

    async def _reset(self, reason: str) -> None:
        self._fresh = False
        self._fresh_checked = 0.0
        LOOP_RESETS.labels(self.name, reason.split(":")[0]).inc()
        self.resets.append(reason)
        if self.on_reset is not None:
            result = self.on_reset(reason)
            if inspect.isawaitable(result):
                await result

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            group_id=self.group,
            enable_auto_commit=False,
            # Broadcast mode positions itself; a position that falls out of the log must be seen.
            auto_offset_reset="none" if self.broadcast else self.start_at,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            max_poll_interval_ms=300_000,
            metadata_max_age_ms=self.metadata_max_age_ms,
            # Long poll: the broker answers as soon as a record arrives; a short wait would only make
            # every idle consumer poll the broker many times a second.
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            # aiokafka's background fetcher keeps its 200 ms timeout (consumer_timeout_ms): it is the
            # fallback that sends fetches for partitions whose leader moved. Raised to the fetch wait,
            # it cut an idle holder's wake-ups from 14 to 7 a second, but a sign-out with one broker
            # stopped took 2.1 s to reach every holder instance instead of 0.5 to 0.8 s.
        )

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            self.consumer = self._new_consumer()
            try:
                await self.consumer.start()
                if self.broadcast:
                    await self._position()
                else:
                    self.consumer.subscribe(self.topics, listener=_Rebalance(self))
                backoff = 0.5
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consume loop failed; reconnecting", exc_info=True, extra={"loop": self.name})
                if self.broadcast:
                    await self._reset(f"failure: {type(exc).__name__}")
            finally:
                self._fresh = False
                with contextlib.suppress(Exception):
                    await self.commit()
                with contextlib.suppress(Exception):
                    await self.consumer.stop()
            if not self._stopping:
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, 10)

    async def _all_partitions(self) -> set[TopicPartition]:
        assert self.consumer is not None
        tps: set[TopicPartition] = set()
        for topic in self.topics:
            parts = self.consumer.partitions_for_topic(topic)
            for _ in range(100):
                if parts:
                    break
                await self.consumer._client.force_metadata_update()
                parts = self.consumer.partitions_for_topic(topic)
                if not parts:
                    await asyncio.sleep(0.2)
            if not parts:
                raise RuntimeError(f"no partitions for topic {topic}")
            tps |= {TopicPartition(topic, p) for p in parts}
        # A topic created a moment ago may not have elected its leaders yet: positioning then fails
        # (and aiokafka logs it as an error). Wait for them, refreshing metadata.
        cluster = self.consumer._client.cluster
        for _ in range(50):
            if all((cluster.leader_for_partition(tp) or -1) >= 0 for tp in tps):
                break
            await asyncio.sleep(0.2)
            await self.consumer._client.force_metadata_update()
        return tps

    async def _position(self, keep: dict[TopicPartition, int] | None = None) -> None:
        """Assign every partition; seek new ones to the start point and resolve every position before
        reporting fresh (a position resolved later could skip records published meanwhile)."""
        assert self.consumer is not None
        self._fresh = False
        tps = await self._all_partitions()
        self.consumer.assign(list(tps))
        keep = keep or {}
        new = [tp for tp in tps if tp not in keep]
        for tp, offset in keep.items():
            if tp in tps:
                self.consumer.seek(tp, offset)
        if new:
            # Explicit offsets (ListOffsets, retried quietly while a new topic elects its leaders)
            # rather than seek_to_end, whose background reset logs every retry as an error.
            edge = (await self.consumer.end_offsets(new) if self.start_at == "latest"
                    else await self.consumer.beginning_offsets(new))
            for tp in new:
                self.consumer.seek(tp, edge[tp])
        self._expected = {tp: await self.consumer.position(tp) for tp in tps}
        self._positioned_ms = {tp: time.time() * 1000 for tp in tps}
        await self._reset("positioned" if not keep else "partitions added")
        # Fresh from here while every partition keeps answering fetches (checked in _poll and fresh).
        self._fresh = True
        self.started.set()

    async def _poll(self) -> None:
        assert self.consumer is not None
        last_meta = time.monotonic()
        vouched = True
        while not self._stopping:
            try:
                batches = await self.consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
            except OffsetOutOfRangeError as exc:
                # Records this instance never read were deleted (retention): a gap.
                tps = list(exc.args[0]) if exc.args and isinstance(exc.args[0], dict) else list(self._expected)
                for tp, offset in (await self.consumer.end_offsets(tps)).items():
                    self.consumer.seek(tp, offset)
                for tp in tps:
                    self._expected[tp] = await self.consumer.position(tp)
                await self._reset("gap: out of range")
                self._fresh = True
                continue
            if not self.broadcast:
                self.started.set()  # joined the group and polled once
            for tp, records in batches.items():
                if not records:
                    continue
                if self.broadcast:
                    expected = self._expected.get(tp)
                    if expected is not None and records[0].offset != expected:
                        got = records[0].offset
                        await self._reset(f"gap: {tp.topic}[{tp.partition}] expected {expected} got {got}")
                        self._fresh = True
                    self._expected[tp] = records[-1].offset + 1
                await self.on_records(tp, records)
                self._pending[tp] = records[-1].offset + 1
            if batches and not self.broadcast:
                await self.commit()
            if self.broadcast:
                stale = self._stale_partitions()
                if stale and vouched and self._fresh_once():
                    await self._reset(f"stale: {len(stale)} partitions unanswered for {self.max_staleness:.0f}s")
                    vouched = False
                elif not stale and not vouched:
                    self._fresh = True  # the stream answers again; the cache was dropped when it stalled
                    vouched = True
                if time.monotonic() - last_meta > self.metadata_max_age_ms / 1000:
                    last_meta = time.monotonic()
                    now_tps = await self._all_partitions()
                    if now_tps - set(self._expected):
                        keep = {tp: await self.consumer.position(tp) for tp in self._expected}
                        await self._position(keep)

    def _fresh_once(self) -> bool:
        """Whether every partition has answered at least one fetch since it was positioned (before
        that a missing timestamp is not yet staleness)."""
        assert self.consumer is not None
        return all(self.consumer.last_poll_timestamp(tp) is not None for tp in self._expected)


async def apply_once(pool: asyncpg.Pool, consumer: str, handler: DbHandler, env: Envelope) -> bool:
    """Apply ``env`` as consumer ``consumer`` does, in one transaction with its ``processed_events``
    marker: False, and nothing done, when that consumer has applied it already. This is the single
    path of :class:`ConsumerRunner`, also for a service handed an event directly, ahead of its copy
    on Kafka (devicesession gets auth's ``password.changed`` that way): whichever of the two comes
    second finds the marker, or waits on the first's uncommitted one and then finds it."""
    async with pool.acquire() as conn, conn.transaction():
        fresh = await conn.fetchval(
            "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1",
            consumer, env.id)
        if not fresh:
            return False
        await handler(conn, env)
        return True


def infrastructure_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the database (or the network) is unavailable, not that the event is bad."""
    return isinstance(exc, (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                            asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
                            asyncpg.ConnectionDoesNotExistError))


# Records of one partition applied in one transaction at the most (see ConsumerRunner._handle_records),
# and the longest such a transaction waits for a lock before its records go one by one.
BATCH = 100
BATCH_LOCK_WAIT_MS = 200
_BATCH_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = '{BATCH_LOCK_WAIT_MS}ms'"


class ConsumerRunner:
    """Consumes ``topics`` in ``group`` and applies ``handler`` to each decoded envelope.

    Give ``pool`` and a :data:`DbHandler` for transactional idempotency, or no pool and a
    :data:`PlainHandler`. ``types`` filters by event type (others are committed and skipped).
    Built on :class:`ConsumeLoop` in group mode.
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
        self.group = group
        self.topics = list(topics)
        self.handler = handler
        self.producer = producer
        self.pool = pool
        self.types = set(types) if types else None
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.loop = ConsumeLoop(
            bootstrap=bootstrap, topics=self.topics, group=group, on_records=self._handle_records,
            start=auto_offset_reset, on_assigned=on_assigned, on_revoked=on_revoked, max_records=max_records,
            # The broker answers a waiting fetch as soon as a record arrives, so the wait bounds only
            # how often an idle consumer asks (each ask costs the broker and this process CPU).
            fetch_max_wait_ms=1000, poll_timeout_ms=1000, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms, client_id=group,
        )
        self.started = self.loop.started

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        return self.loop.consumer

    async def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        """Finish the batch in hand, commit, leave the group."""
        await self.loop.stop()

    async def _handle_records(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        # With a database, what one poll brought of a partition is applied in one transaction (up to
        # BATCH records each): one commit, one WAL flush, for a burst such as the acknowledgements
        # of every holder instance for one revocation, which one transaction each queued behind
        # each other's flush. If anything in a batch fails, nothing of it is kept and its records go
        # one at a time, with the retries and dead letters of the single path.
        start = 0
        while start < len(records):
            chunk = records[start:start + BATCH]
            start += len(chunk)
            if self.pool is None or len(chunk) == 1 or not await self._apply_batch(chunk):
                for record in chunk:
                    await self._handle_record(record)

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
        with logs.handling_event(str(env.id), env.trace):
            await self._handle_decoded(record, env)

    async def _handle_decoded(self, record: ConsumerRecord[Any, Any], env: Envelope) -> None:
        """One decoded event through the handler: retried with backoff, held while the database is
        down, dead-lettered after ``max_attempts``."""
        EVENT_AGE.labels(self.group).observe(max(0.0, time.time() - env.occurred_at.timestamp()))
        last_error = ""
        attempt = 0
        outage = 0
        while attempt < self.max_attempts:
            attempt += 1
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
                if infrastructure_failure(exc):
                    # Wait for the database to come back; this does not use up the event's attempts.
                    attempt -= 1
                    outage += 1
                    if outage in (1, 10) or outage % 100 == 0:
                        log.warning("database unavailable; event held until it is back",
                                    extra={"group": self.group, "type": env.type, "error": last_error})
                    await asyncio.sleep(min(2.0, 0.1 * outage) * (0.5 + random.random() / 2))
                    continue
                log.warning(
                    "event handler failed",
                    extra={"group": self.group, "type": env.type, "attempt": attempt, "error": last_error},
                )
                if attempt < self.max_attempts:
                    delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))
        CONSUMED.labels(self.group, env.type, "dead_letter").inc()
        await self._dead_letter(record, last_error, attempts=self.max_attempts)

    async def _apply_batch(self, records: list[ConsumerRecord[Any, Any]]) -> bool:
        """Apply ``records`` in order in one transaction; False (and nothing written) when one does
        not decode or anything fails, for the single path to handle them one by one."""
        assert self.pool is not None
        try:
            envs = [Envelope.decode(record.value) for record in records]
        except ValueError:
            return False
        wanted = [env for env in envs if self.types is None or env.type in self.types]
        outcomes: list[tuple[Envelope, str]] = []
        started = time.perf_counter()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # A batch holds the locks of all its events until it commits. It never waits long for
                # someone else's: past BATCH_LOCK_WAIT it gives up (nothing kept) and its events go one
                # per transaction, each holding few locks. That also breaks, from this side and at
                # once, any lock cycle with another replica's batch.
                await conn.execute(_BATCH_LOCK_TIMEOUT)
                ids = list(dict.fromkeys(env.id for env in wanted))
                fresh = {r["event_id"] for r in await conn.fetch(
                    "INSERT INTO processed_events (consumer, event_id) SELECT $1, e FROM unnest($2::uuid[]) AS e"
                    " ON CONFLICT DO NOTHING RETURNING event_id", self.group, ids)}
                for env in envs:
                    if self.types is not None and env.type not in self.types:
                        outcomes.append((env, "skipped"))
                        continue
                    if env.id not in fresh:
                        outcomes.append((env, "duplicate"))
                        continue
                    fresh.discard(env.id)  # the same event twice in one batch: the second is a duplicate
                    with logs.handling_event(str(env.id), env.trace):
                        await self.handler(conn, env)  # type: ignore[call-arg, arg-type]
                    outcomes.append((env, "handled"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("batch not applied; its events go one at a time",
                     extra={"group": self.group, "events": len(records), "error": f"{type(exc).__name__}: {exc}"})
            return False
        took = (time.perf_counter() - started) / max(1, len(wanted))
        now = time.time()
        for env, outcome in outcomes:
            CONSUMED.labels(self.group, env.type, outcome).inc()
            if outcome != "skipped":
                EVENT_AGE.labels(self.group).observe(max(0.0, now - env.occurred_at.timestamp()))
            if outcome == "handled":
                HANDLE_SECONDS.labels(self.group).observe(took)
        return True

    async def _apply(self, env: Envelope) -> str:
        if self.pool is None:
            await self.handler(env)  # type: ignore[call-arg, arg-type]
            return "handled"
        applied = await apply_once(self.pool, self.group, self.handler, env)  # type: ignore[arg-type]
        return "handled" if applied else "duplicate"

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
