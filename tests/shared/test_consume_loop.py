"""The one consume loop, broadcast mode, against the real broker: every loop reads every partition,
from the end; a gap it cannot rule out is reported (the holder kit drops its cache on it)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from shared import kafka
from shared.consumer import ConsumeLoop
from tests.conftest import Infra, eventually


async def test_every_broadcast_loop_reads_every_partition_from_the_end(infra: Infra, topic: str) -> None:
    await kafka.ensure_topics(infra.kafka_bootstrap, [topic], partitions=4)
    producer = kafka.make_producer(infra.kafka_bootstrap)
    await kafka.start_producer(producer)
    try:
        for i in range(8):  # before the loops start: not for them
            await producer.send_and_wait(topic, b"old", key=f"k{i}".encode())
        seen: list[list[bytes]] = [[], []]
        resets: list[list[str]] = [[], []]

        def make(n: int) -> ConsumeLoop:
            async def on_records(tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
                seen[n].extend(r.value for r in records)

            return ConsumeLoop(bootstrap=infra.kafka_bootstrap, topics=[topic], on_records=on_records,
                               on_reset=resets[n].append, fetch_max_wait_ms=100)

        loops = [make(0), make(1)]
        for loop in loops:
            loop.start()
        await asyncio.wait_for(asyncio.gather(*(lp.started.wait() for lp in loops)), 60)
        await eventually(lambda: all(lp.fresh for lp in loops), timeout=10)
        for i in range(40):  # keys spread over all four partitions
            await producer.send_and_wait(topic, f"new-{i}".encode(), key=f"k{i}".encode())
        want = sorted(f"new-{i}".encode() for i in range(40))
        await eventually(lambda: all(sorted(s) == want for s in seen), timeout=15)
        assert resets == [["positioned"], ["positioned"]]
        assert all(loop.consumer is not None and loop.consumer._group_id is None for loop in loops)  # no group

        # A position that skips records (as after a lost fetch) is a gap: reported, then reading goes on.
        loop = loops[0]
        assert loop.consumer is not None
        tp = TopicPartition(topic, 0)
        loop.consumer.pause(tp)  # nothing fetched from partition 0 until the position has moved
        end = await loop.consumer.position(tp)
        for i in range(3):
            await producer.send_and_wait(topic, f"p0-{i}".encode(), partition=0)
        loop.consumer.seek(tp, end + 2)
        loop.consumer.resume(tp)
        await eventually(lambda: any(r.startswith("gap") for r in resets[0]), timeout=15)
        await eventually(lambda: b"p0-2" in seen[0], timeout=5)  # reported before the records are handed over
        assert b"p0-0" not in seen[0][40:]
        for lp in loops:
            await lp.stop(wait=2)
    finally:
        await producer.stop()
