"""Backbone: outbox-to-consumer latency beside the broker's own round trip; relay throughput.

- Latency: one event committed at a time (the next once the last was handled) through the outbox
  (relay woken by LISTEN/NOTIFY) until a ConsumerRunner handler sees it, versus a bare aiokafka produce (acks=all) until a bare consumer
  sees it, on the same broker in the same run.
- Throughput: N events already in the outbox, relayed to Kafka (broker-acknowledged and stamped),
  versus the same N records sent by a bare producer.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from bench.common import Row, broker_round_trip, summary_ms
from deploy.launcher import Stack
from shared import db, kafka, outbox
from shared.consumer import ConsumerRunner
from shared.events import Envelope, utcnow
from shared.outbox import OutboxRelay
from shared.settings import with_database

NAME = "backbone"
SAMPLES = 300
THROUGHPUT_EVENTS = 50_000


def _event(i: int) -> Envelope:
    return Envelope(uuid.uuid4(), "bench.happened", utcnow(), "bench", f"acct-{i % 97}", {"i": i})


async def _outbox_latency(stack: Stack, dsn: str, topic: str) -> list[float]:
    pool = await db.create_pool(dsn, max_size=4)
    producer = kafka.make_producer(stack.kafka_bootstrap)
    await producer.start()
    relay = OutboxRelay(dsn, pool, producer, service="bench", poll_interval=1.0)
    relay.start()
    committed: dict[str, float] = {}
    got: list[float] = []
    seen = asyncio.Event()

    async def handle(env: Envelope) -> None:
        t0 = committed.get(str(env.id))
        if t0 is not None:
            got.append(time.perf_counter() - t0)
            seen.set()

    runner = ConsumerRunner(bootstrap=stack.kafka_bootstrap, group=f"bench-{uuid.uuid4().hex[:6]}", topics=[topic],
                            handler=handle, producer=producer, auto_offset_reset="latest")
    await runner.start()
    await asyncio.sleep(2.0)
    for i in range(SAMPLES):
        env = _event(i)
        seen.clear()
        async with pool.acquire() as conn:
            async with conn.transaction():
                await outbox.add(conn, topic, env)
            committed[str(env.id)] = time.perf_counter()
        # One at a time: the next event is committed once this one was handled (else the figure
        # would measure queueing behind the relay's previous batch, not one event's way through).
        await asyncio.wait_for(seen.wait(), 10)
        await asyncio.sleep(0.005)
    assert len(got) == SAMPLES
    await runner.stop()
    await relay.stop()
    await producer.stop()
    await pool.close()
    return got


async def _relay_throughput(stack: Stack, dsn: str, topic: str) -> float:
    pool = await db.create_pool(dsn, max_size=4)
    async with pool.acquire() as conn:
        for start in range(0, THROUGHPUT_EVENTS, 5000):
            async with conn.transaction():
                await outbox.add_many(conn, topic, [_event(i) for i in range(start, start + 5000)])
    producer = kafka.make_producer(stack.kafka_bootstrap)
    await producer.start()
    relay = OutboxRelay(dsn, pool, producer, service="bench-throughput", poll_interval=0.2, batch_size=2000)
    t0 = time.perf_counter()
    relay.start()
    while True:
        async with pool.acquire() as conn:
            left = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        if left == 0:
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    await relay.stop()
    await producer.stop()
    await pool.close()
    return THROUGHPUT_EVENTS / elapsed


async def _producer_throughput(bootstrap: str, topic: str) -> float:
    producer = kafka.make_producer(bootstrap)
    await producer.start()
    payloads = [(_event(i).encode(), f"acct-{i % 97}".encode()) for i in range(THROUGHPUT_EVENTS)]
    t0 = time.perf_counter()
    futures = [await producer.send(topic, value, key=key) for value, key in payloads]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    await producer.stop()
    return THROUGHPUT_EVENTS / elapsed


async def run(stack: Stack) -> list[Row]:
    dsn = with_database(stack.database_url, f"bench_backbone_{uuid.uuid4().hex[:6]}")
    await db.ensure_database(dsn)
    pool = await db.create_pool(dsn, max_size=2)
    await db.migrate(pool, [])
    await pool.close()
    prefix = f"bench.backbone-{uuid.uuid4().hex[:6]}"
    topics = [f"{prefix}.ref", f"{prefix}.outbox", f"{prefix}.tput", f"{prefix}.tputref"]
    await kafka.ensure_topics(stack.kafka_bootstrap, topics)
    ref = summary_ms(await broker_round_trip(stack.kafka_bootstrap))
    lat = summary_ms(await _outbox_latency(stack, dsn, topics[1]))
    relay_rate = await _relay_throughput(stack, dsn, topics[2])
    producer_rate = await _producer_throughput(stack.kafka_bootstrap, topics[3])
    conn = await asyncpg.connect(with_database(stack.database_url, "postgres"))
    await conn.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    await conn.close()
    ref_name = "broker produce->consume"
    return [
        Row(NAME, "outbox->consumer p50", lat["p50"], "ms", ref_name + " p50", ref["p50"]),
        Row(NAME, "outbox->consumer p99", lat["p99"], "ms", ref_name + " p99", ref["p99"]),
        Row(NAME, "relay throughput", relay_rate, "events/s", "bare producer (acks=all)", producer_rate),
    ]
