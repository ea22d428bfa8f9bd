"""The event backbone against the real broker and database: outbox, relay, consumer runner."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from deploy.launcher import Kafka, Output, free_port
from shared import db, kafka, outbox
from shared.consumer import CONSUMED, ConsumerRunner
from shared.events import Envelope, dead_letter_topic, utcnow
from shared.outbox import OutboxRelay
from tests.conftest import ROOT, Infra, eventually

pytestmark = pytest.mark.timeout(180)


def make_event(key: str = "acct-1", n: int = 0, type_: str = "test.happened") -> Envelope:
    return Envelope(id=uuid.uuid4(), type=type_, occurred_at=utcnow(), producer="test", key=key, data={"n": n})


async def collect(bootstrap: str, topic: str, want: int, timeout: float = 20) -> list[Envelope]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"collect-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    got: list[Envelope] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(got) < want and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                got += [Envelope.decode(r.value) for r in records]
    finally:
        await consumer.stop()
    return got


@pytest.fixture
async def relay_setup(infra: Infra, scratch_db: str, topic: str):  # type: ignore[no-untyped-def]
    await kafka.ensure_topics(infra.kafka_bootstrap, [topic])
    pool = await db.create_pool(scratch_db, max_size=4)
    producer = kafka.make_producer(infra.kafka_bootstrap)
    await producer.start()
    relay = OutboxRelay(scratch_db, pool, producer, service="test", poll_interval=0.5)
    relay.start()
    yield pool, producer, relay
    await relay.stop()
    await producer.stop()
    await pool.close()


async def test_committed_event_reaches_consumer_and_rolled_back_one_does_not(infra: Infra, relay_setup, topic: str):
    pool, producer, _relay = relay_setup
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE things (id int PRIMARY KEY)")
    rolled_back = make_event(n=1)
    committed = make_event(n=2)
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("INSERT INTO things VALUES (1)")
                await outbox.add(conn, topic, rolled_back)
                raise RuntimeError("the state change fails after the event was written")
        async with conn.transaction():
            await conn.execute("INSERT INTO things VALUES (2)")
            await outbox.add(conn, topic, committed)

    seen: list[Envelope] = []

    async def handle(env: Envelope) -> None:
        seen.append(env)

    runner = ConsumerRunner(bootstrap=infra.kafka_bootstrap, group=f"g-{uuid.uuid4().hex[:6]}", topics=[topic],
                            handler=handle, producer=producer)
    await runner.start()
    try:
        await eventually(lambda: seen, timeout=15)
        await asyncio.sleep(1.0)  # anything else would have arrived by now
    finally:
        await runner.stop()
    assert [e.id for e in seen] == [committed.id]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def test_relay_keeps_per_key_order(infra: Infra, relay_setup, topic: str):
    pool, _producer, _relay = relay_setup
    async with pool.acquire() as conn:
        for batch in range(5):
            async with conn.transaction():
                await outbox.add_many(conn, topic, [make_event(key=f"acct-{i % 7}", n=batch * 100 + i)
                                                    for i in range(100)])
    got = await collect(infra.kafka_bootstrap, topic, 500)
    assert len(got) == 500
    by_key: dict[str, list[int]] = {}
    for e in got:
        by_key.setdefault(e.key, []).append(e.data["n"])
    for values in by_key.values():
        assert values == sorted(values)


class _CommitDuringBatch(OutboxRelay):
    """A relay that commits one more row while its first batch is in flight (and waits for that
    row's NOTIFY to arrive), as a busy service's next event does."""

    topic = ""
    late: Envelope | None = None

    async def publish_batch(self) -> int:
        published = await super().publish_batch()
        if published and self.late is None:
            self.late = make_event(n=2)
            async with self.pool.acquire() as conn, conn.transaction():
                await outbox.add(conn, self.topic, self.late)
            await asyncio.sleep(0.3)  # the NOTIFY reaches the relay's listener meanwhile
        return published


async def test_row_committed_while_a_batch_is_in_flight_is_published_without_waiting_for_the_poll(
        infra: Infra, scratch_db: str, topic: str):
    await kafka.ensure_topics(infra.kafka_bootstrap, [topic])
    pool = await db.create_pool(scratch_db, max_size=4)
    producer = kafka.make_producer(infra.kafka_bootstrap)
    await producer.start()
    relay = _CommitDuringBatch(scratch_db, pool, producer, service="test-late", poll_interval=30)
    relay.topic = topic
    try:
        relay.start()
        await eventually(lambda: relay.active, timeout=10)
        await asyncio.sleep(0.2)  # the relay waits on its LISTEN now
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, topic, make_event(n=1))
        t0 = asyncio.get_running_loop().time()
        got = await collect(infra.kafka_bootstrap, topic, 2, timeout=10)
        assert [e.data["n"] for e in got] == [1, 2]
        # the late row went out on the wake-up its NOTIFY gave, not on the 30 s poll
        assert asyncio.get_running_loop().time() - t0 < 5
    finally:
        await relay.stop()
        await producer.stop()
        await pool.close()


async def test_event_committed_while_broker_is_down_arrives_after_restart(infra: Infra, scratch_db: str, tmp_path: Path):
    """The broker is stopped at commit time and started again 10 s later: the event still arrives."""
    out = Output(console=False, log_dir=tmp_path)
    broker = Kafka(tmp_path / "kafka" / "data", free_port(), free_port(), out, heap="384m")
    broker.start()
    topic = "backbone-outage"
    await kafka.ensure_topics(broker.bootstrap, [topic])
    pool = await db.create_pool(scratch_db, max_size=4)
    producer = kafka.make_producer(broker.bootstrap)
    await producer.start()
    relay = OutboxRelay(scratch_db, pool, producer, service="test-outage", poll_interval=0.5)
    relay.start()
    try:
        assert broker.child
        broker.child.stop()  # a clean, real stop of the only broker
        event = make_event(n=42)
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, topic, event)
        await asyncio.sleep(10)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT published_at FROM outbox WHERE event_id = $1", event.id) is None
        broker.start()  # same data directory and ports
        async def published() -> bool:
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1",
                                           event.id)
        await eventually(published, timeout=60, interval=0.2)
        got = await collect(broker.bootstrap, topic, 1)
        assert event.id in {e.id for e in got}
    finally:
        await relay.stop()
        await producer.stop()
        await pool.close()
        if broker.child:
            broker.child.kill()


def start_worker(infra: Infra, dsn: str, topic: str, group: str, worker: str, stats: Path, delay: float):  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.shared.backbone_worker", infra.kafka_bootstrap, dsn, topic, group, worker,
         str(stats), str(delay)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def produce(bootstrap: str, topic: str, events: list[Envelope]) -> None:
    producer = kafka.make_producer(bootstrap)
    await producer.start()
    try:
        futures = [await producer.send(topic, e.encode(), key=e.key.encode(), headers=e.headers()) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def effects(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM effects")
        return int(row["n"]), int(row["d"])
    finally:
        await conn.close()


async def test_consumer_killed_mid_batch_applies_every_event_exactly_once(infra: Infra, scratch_db: str, topic: str,
                                                                          tmp_path: Path):
    conn = await asyncpg.connect(scratch_db)
    await conn.execute("CREATE TABLE effects (event_id uuid NOT NULL, worker text NOT NULL)")
    await conn.close()
    await kafka.ensure_topics(infra.kafka_bootstrap, [topic])
    events = [make_event(key=f"acct-{i % 13}", n=i) for i in range(400)]
    await produce(infra.kafka_bootstrap, topic, events)
    group = f"kill-{uuid.uuid4().hex[:6]}"
    stats = tmp_path / "stats"
    first = start_worker(infra, scratch_db, topic, group, "first", stats, delay=0.01)
    try:
        await eventually(lambda: _at_least(scratch_db, 60), timeout=60)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    applied_before, _ = await effects(scratch_db)
    assert 0 < applied_before < 400, "the kill must land mid-stream"
    # Whether the killed worker's last offsets were committed depends on where the kill landed (a
    # batch's events commit together, then its offsets); rewind the group, so the second worker is
    # sure to be handed events that were applied already, and must recognise every one of them.
    await rewind_group(infra.kafka_bootstrap, topic, group)
    second = start_worker(infra, scratch_db, topic, group, "second", stats, delay=0.0)
    try:
        await eventually(lambda: _at_least(scratch_db, 400), timeout=60)
        await asyncio.sleep(1.5)
        await eventually(lambda: stats.exists() and int(stats.read_text() or 0) > 0, timeout=10)
    finally:
        second.terminate()
        second.wait()
    total, distinct = await effects(scratch_db)
    assert (total, distinct) == (400, 400)


async def rewind_group(bootstrap: str, topic: str, group: str, within: float = 30) -> None:
    """Commit offset 0 on every partition of ``topic`` for ``group`` once the group is empty (a
    killed member stays in it until its session times out, and until then a commit from outside it
    is refused)."""
    from aiokafka import TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or
                                                                  await _partitions(consumer, topic))]
        consumer.assign(partitions)
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                await consumer.commit({tp: OffsetAndMetadata(0, "") for tp in partitions})
                return
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 (a consumer with no subscription yet)
    return consumer._client.cluster.partitions_for_topic(topic) or set()  # noqa: SLF001


async def _at_least(dsn: str, n: int) -> bool:
    return (await effects(dsn))[0] >= n


async def test_poison_message_is_dead_lettered_and_does_not_block(infra: Infra, topic: str):
    await kafka.ensure_topics(infra.kafka_bootstrap, [topic])
    key = "same-partition"
    good_before = make_event(key=key, n=1)
    poison = make_event(key=key, n=2, type_="test.poison")
    good_after = make_event(key=key, n=3)
    producer = kafka.make_producer(infra.kafka_bootstrap)
    await producer.start()
    await producer.send_and_wait(topic, good_before.encode(), key=key.encode())
    await producer.send_and_wait(topic, b"{not json", key=key.encode())
    await producer.send_and_wait(topic, poison.encode(), key=key.encode())
    await producer.send_and_wait(topic, good_after.encode(), key=key.encode())
    handled: list[int] = []
    attempts = {"poison": 0}

    async def handle(env: Envelope) -> None:
        if env.type == "test.poison":
            attempts["poison"] += 1
            raise RuntimeError("cannot apply this one")
        handled.append(env.data["n"])

    group = f"poison-{uuid.uuid4().hex[:6]}"
    runner = ConsumerRunner(bootstrap=infra.kafka_bootstrap, group=group, topics=[topic], handler=handle,
                            producer=producer, max_attempts=3, backoff_base=0.01)
    await runner.start()
    try:
        await eventually(lambda: handled == [1, 3], timeout=20)
    finally:
        await runner.stop()
        await producer.stop()
    assert attempts["poison"] == 3
    dlq = dead_letter_topic(group)
    consumer = AIOKafkaConsumer(dlq, bootstrap_servers=infra.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = []
        deadline = asyncio.get_running_loop().time() + 15
        while len(records) < 2 and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records += batch
    finally:
        await consumer.stop()
    reasons = sorted(dict(r.headers)["dlq_reason"].decode().split(":")[0] for r in records)
    assert reasons == ["RuntimeError", "decode"]


async def _consume_into_table(infra: Infra, scratch_db: str, topic: str, events: list[Envelope], columns: str,
                              handler, want: int) -> tuple[list[asyncpg.Record], str]:  # type: ignore[no-untyped-def]
    """Publish ``events`` to ``topic``, then run a ConsumerRunner with a database (``handler`` writes
    to table ``effects (seq bigserial, <columns>)``) until ``want`` rows exist and a second more.
    Returns the rows in the order written, and the consumer group."""
    await kafka.ensure_topics(infra.kafka_bootstrap, [topic])
    await produce(infra.kafka_bootstrap, topic, events)
    pool = await db.create_pool(scratch_db, max_size=2)
    await pool.execute(f"CREATE TABLE effects (seq bigserial, {columns})")
    producer = kafka.make_producer(infra.kafka_bootstrap)
    await producer.start()
    group = f"batch-{uuid.uuid4().hex[:6]}"
    runner = ConsumerRunner(bootstrap=infra.kafka_bootstrap, group=group, topics=[topic], handler=handler,
                            producer=producer, pool=pool, max_attempts=2, backoff_base=0.01)
    await runner.start()
    try:
        await eventually(lambda: pool.fetchval("SELECT count(*) >= $1 FROM effects", want), timeout=30)
        await asyncio.sleep(1.0)  # anything more would have arrived by now
        return await pool.fetch("SELECT * FROM effects ORDER BY seq"), group
    finally:
        await runner.stop()
        await producer.stop()
        await pool.close()


async def test_a_burst_on_one_partition_is_applied_in_shared_transactions_once_and_in_order(
        infra: Infra, scratch_db: str, topic: str):
    """300 events on one partition, already there when the consumer starts (a burst such as every
    holder instance acknowledging one revocation): each applied once, in order, in far fewer
    transactions (commits) than events. A redelivered copy inside the same batch has no effect."""
    events = [make_event(key="one-partition", n=i) for i in range(300)]

    async def handle(conn: asyncpg.Connection, env: Envelope) -> None:
        await conn.execute("INSERT INTO effects (n, tx) VALUES ($1, txid_current())", env.data["n"])

    rows, _ = await _consume_into_table(infra, scratch_db, topic, [*events[:150], events[10], *events[150:]],
                                        "n int NOT NULL, tx bigint NOT NULL", handle, want=300)
    assert [r["n"] for r in rows] == list(range(300))
    transactions = len({r["tx"] for r in rows})
    print(f"300 events applied in {transactions} transactions")
    assert transactions <= 30


async def test_a_failing_event_in_a_batch_keeps_nothing_of_the_batch_and_the_others_apply_once(
        infra: Infra, scratch_db: str, topic: str):
    """One event in a burst fails every time: the batch is rolled back, its records go one by one,
    the failing one is dead-lettered and every other one is applied exactly once, in order."""
    events = [make_event(key="one-partition", n=i, type_="test.poison" if i == 25 else "test.happened")
              for i in range(50)]

    async def handle(conn: asyncpg.Connection, env: Envelope) -> None:
        await conn.execute("INSERT INTO effects (n) VALUES ($1)", env.data["n"])
        if env.type == "test.poison":
            raise RuntimeError("cannot apply this one")

    rows, group = await _consume_into_table(infra, scratch_db, topic, events, "n int NOT NULL", handle, want=49)
    assert [r["n"] for r in rows] == [n for n in range(50) if n != 25]
    assert CONSUMED.labels(group, "test.poison", "dead_letter")._value.get() == 1
    assert CONSUMED.labels(group, "test.happened", "handled")._value.get() == 49


async def test_a_batch_that_would_wait_for_a_lock_goes_one_by_one(infra: Infra, scratch_db: str, topic: str):
    """Another transaction holds a row every event of a burst updates: the batch gives up waiting
    (BATCH_LOCK_WAIT_MS) and keeps nothing; the events then apply one per transaction, once each and
    in order, as soon as the row is free."""
    pool = await db.create_pool(scratch_db, max_size=3)
    await pool.execute("CREATE TABLE hot (id int PRIMARY KEY, n int NOT NULL); INSERT INTO hot VALUES (1, 0)")
    holder = await pool.acquire()
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT n FROM hot WHERE id = 1 FOR UPDATE")

    async def release_later() -> None:
        # Hold the row until the consumer has waited for it, then 1 s more: by then the batch has
        # given up and the first event waits on its own.
        await eventually(lambda: pool.fetchval("SELECT count(*) > 0 FROM pg_stat_activity"
                                               " WHERE datname = current_database() AND wait_event_type = 'Lock'"),
                         timeout=30)
        await asyncio.sleep(1.0)
        await tx.commit()
        await pool.release(holder)

    async def handle(conn: asyncpg.Connection, env: Envelope) -> None:
        await conn.execute("UPDATE hot SET n = n + 1 WHERE id = 1")
        await conn.execute("INSERT INTO effects (n, tx) VALUES ($1, txid_current())", env.data["n"])

    releasing = asyncio.create_task(release_later())
    try:
        rows, _ = await _consume_into_table(infra, scratch_db, topic,
                                            [make_event(key="one-partition", n=i) for i in range(20)],
                                            "n int NOT NULL, tx bigint NOT NULL", handle, want=20)
    finally:
        await releasing
    assert [r["n"] for r in rows] == list(range(20))
    assert len({r["tx"] for r in rows}) > 1  # not the one batch that would have waited for the row
    assert await pool.fetchval("SELECT n FROM hot WHERE id = 1") == 20
    await pool.close()


async def test_two_replicas_share_partitions_and_survivor_takes_over(infra: Infra, scratch_db: str, topic: str,
                                                                   tmp_path: Path):
    conn = await asyncpg.connect(scratch_db)
    await conn.execute("CREATE TABLE effects (event_id uuid NOT NULL, worker text NOT NULL)")
    await conn.close()
    await kafka.ensure_topics(infra.kafka_bootstrap, [topic], partitions=4)
    group = f"pair-{uuid.uuid4().hex[:6]}"
    a = start_worker(infra, scratch_db, topic, group, "a", tmp_path / "a", delay=0.02)
    b = start_worker(infra, scratch_db, topic, group, "b", tmp_path / "b", delay=0.02)
    try:
        await asyncio.sleep(4)  # both join the group
        first = [make_event(key=f"acct-{i}", n=i) for i in range(200)]
        await produce(infra.kafka_bootstrap, topic, first)

        async def both_working() -> bool:
            c = await asyncpg.connect(scratch_db)
            try:
                return await c.fetchval("SELECT count(DISTINCT worker) FROM effects") == 2
            finally:
                await c.close()

        await eventually(both_working, timeout=30)
        a.send_signal(signal.SIGKILL)
        a.wait()
        second = [make_event(key=f"acct-{i}", n=1000 + i) for i in range(200)]
        await produce(infra.kafka_bootstrap, topic, second)
        await eventually(lambda: _at_least(scratch_db, 400), timeout=60)
        await asyncio.sleep(1.0)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait()
    total, distinct = await effects(scratch_db)
    assert (total, distinct) == (400, 400)
