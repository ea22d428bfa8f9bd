"""A real consumer process for the backbone tests (killed with SIGKILL, restarted, replicated).

Consumes TOPIC in GROUP with the shared ConsumerRunner; each event's effect is one row in
``effects`` (no unique constraint: a second application would show as a second row). Every 100 ms
it writes its duplicate count to STATS so the test can see redeliveries were recognised.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from shared import db, kafka
from shared.consumer import CONSUMED, ConsumerRunner
from shared.events import Envelope


async def main(bootstrap: str, dsn: str, topic: str, group: str, worker: str, stats: str, delay: float) -> None:
    pool = await db.create_pool(dsn, max_size=4)
    producer = kafka.make_producer(bootstrap)
    await producer.start()

    async def handle(conn: asyncpg.Connection, env: Envelope) -> None:
        await conn.execute("INSERT INTO effects (event_id, worker) VALUES ($1, $2)", env.id, worker)
        if delay:
            await asyncio.sleep(delay)

    runner = ConsumerRunner(bootstrap=bootstrap, group=group, topics=[topic], handler=handle, producer=producer,
                            pool=pool, max_records=50, session_timeout_ms=6000, heartbeat_interval_ms=500)
    await runner.start()
    print("started", flush=True)
    while True:
        dup = CONSUMED.labels(group, "test.happened", "duplicate")._value.get()
        with open(stats, "w") as f:
            f.write(str(int(dup)))
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], a[2], a[3], a[4], a[5], float(a[6])))
