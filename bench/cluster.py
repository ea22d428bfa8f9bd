"""The cluster topology (issue 17): three brokers at replication factor 3 / min.insync.replicas=2,
two replicas of every service, 20 sample holders with two instances each.

- Fan-out to every holder instance: for every (revocation, holder instance) pair, the time from
  the password-change HTTP response to that instance having evicted the old tokens (its
  ``revocation.applied``, which names the instance), beside the brokers' own produce (acks=all)
  -> consume time on an RF 3 topic in the same run. The single-broker figure is ``fanout`` in the
  same ``make bench`` run.
- Fan-out to 200 holder instances: the 40 processes plus 160 kits in this process (many kits per
  process), 50 changes; how p99 grows from 40 to 200 instances.
- Sign-in throughput with two auth replicas behind nginx beside raw argon2 on the same cores
  (``bench.signin`` run against this stack).

``run(stack)`` expects the cluster stack; ``python -m bench cluster`` starts one.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import aiohttp
import asyncpg

from bench import fanout as single
from bench.common import Row, broker_round_trip, service_db, summary_ms
from deploy.launcher import Stack
from shared.consumer import ConsumeLoop
from shared.events import REVOCATIONS_APPLIED, Envelope, parse_time
from shared.holder import HolderKit, holder_secret

NAME = "cluster"
CHANGES = 200
EXTRA_KITS = 160


async def warm(stack: Stack, token_sets: list[list[str]]) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        sem = asyncio.Semaphore(48)

        async def get(port: int, token: str) -> None:
            async with sem, http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": token}) as r:
                assert r.status == 200, r.status

        await asyncio.gather(*(get(p, t) for p in stack.holder_ports() for ts in token_sets for t in ts))


async def measure(stack: Stack, plain: dict[str, list[str]], accounts: list[str],
                  expected: set[tuple[str, str]]) -> tuple[list[float], int, int]:
    """Change the passwords of ``accounts`` one at a time; (response->applied per pair, missing, pairs)."""
    acks: dict[str, dict[tuple[str, str], float]] = {}

    async def on_records(tp: object, records: list) -> None:  # type: ignore[type-arg]
        for rec in records:
            env = Envelope.decode(rec.value)
            who = (str(env.data["holder_id"]), str(env.data.get("instance_id", "")))
            acks.setdefault(env.data["revocation_id"], {})[who] = parse_time(env.data["applied_at"]).timestamp()

    loop = ConsumeLoop(bootstrap=stack.kafka_bootstrap, topics=[stack.topic_prefix + REVOCATIONS_APPLIED],
                       on_records=on_records, fetch_max_wait_ms=20, poll_timeout_ms=100, name="bench-acks")
    loop.start()
    await asyncio.wait_for(loop.started.wait(), 60)
    responses: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for a in accounts:  # one at a time: concurrent changes would measure argon2 queueing on 2 cores
            async with http.put(stack.edge_url + "/api/v2/user/password",
                                data={"currentPassword": single.PASSWORD, "password": single.PASSWORD + " new",
                                      "signOutDevices": "true"},
                                headers={"X-Plex-Token": plain[a][0], "Accept": "application/json"}) as r:
                assert r.status == 204, await r.text()
                responses[r.headers["X-Hearth-Event-Id"]] = time.time()
    ds = await asyncpg.connect(service_db(stack, "devicesession"))
    try:
        rows = await ds.fetch("SELECT id, causing_event_id FROM revocations WHERE causing_event_id = ANY($1::uuid[])",
                              [uuid.UUID(e) for e in responses])
    finally:
        await ds.close()
    rev_to_event = {str(r["id"]): str(r["causing_event_id"]) for r in rows}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(expected <= set(acks.get(r, {})) for r in rev_to_event):
        await asyncio.sleep(0.2)
    await loop.stop(wait=2)
    lat, missing = [], 0
    for rid, eid in rev_to_event.items():
        for who in expected:
            applied = acks.get(rid, {}).get(who)
            if applied is None:
                missing += 1
            else:
                lat.append(max(0.0, applied - responses[eid]))
    return lat, missing, len(rev_to_event) * len(expected)


async def run(stack: Stack) -> list[Row]:
    os.environ.setdefault("TOPIC_REPLICATION_FACTOR", stack.env.get("TOPIC_REPLICATION_FACTOR", "1"))
    os.environ.setdefault("TOPIC_MIN_INSYNC_REPLICAS", stack.env.get("TOPIC_MIN_INSYNC_REPLICAS", ""))
    plain = await single.seed(stack)
    ids = list(plain)
    first, second = ids[:CHANGES], ids[CHANGES:CHANGES + 50]
    await warm(stack, [plain[a][1:] for a in first + second])
    expected = {(h, stack.instance_id(k)) for h in stack.holders for k in stack.holder_keys(h)}
    lat40, miss40, pairs40 = await measure(stack, plain, first, expected)
    ref = summary_ms(await broker_round_trip(stack.kafka_bootstrap))
    r40 = summary_ms(lat40)
    n = len(expected)
    rows = [
        Row(NAME, f"response->instance evicted p50 ({n} instances, RF 3)", r40["p50"], "ms",
            "brokers produce->consume p50", ref["p50"]),
        Row(NAME, "response->instance evicted p99", r40["p99"], "ms", "brokers produce->consume p99", ref["p99"],
            "p99 < 100 ms"),
        Row(NAME, "response->instance evicted max", r40["max"], "ms", "brokers produce->consume max", ref["max"]),
        Row(NAME, f"(revocation, instance) pairs missing of {pairs40}", float(miss40), "", goal="0"),
    ]
    kits = [HolderKit(holder_id=f"k{i // 2:03d}", instance=f"k{i // 2:03d}-{i % 2 + 1}",
                      introspect_url=stack.url("devicesession") + "/oauth/introspect",
                      holder_secret=holder_secret(stack.env["HOLDER_SECRET"], f"k{i // 2:03d}"),
                      bootstrap=stack.kafka_bootstrap, topic_prefix=stack.topic_prefix)
            for i in range(EXTRA_KITS)]
    await asyncio.gather(*(k.start() for k in kits))
    try:
        await asyncio.wait_for(asyncio.gather(*(k.assigned.wait() for k in kits)), 120)
        more = expected | {(k.holder_id, k.instance_id) for k in kits}
        lat200, miss200, pairs200 = await measure(stack, plain, second, more)
    finally:
        await asyncio.gather(*(k.stop() for k in kits), return_exceptions=True)
    r200 = summary_ms(lat200)
    rows += [
        Row(NAME, f"response->instance evicted p50 ({len(more)} instances)", r200["p50"], "ms",
            f"with {n} instances", r40["p50"]),
        Row(NAME, f"response->instance evicted p99 ({len(more)} instances)", r200["p99"], "ms",
            f"with {n} instances", r40["p99"], "p99 < 250 ms"),
        Row(NAME, f"(revocation, instance) pairs missing of {pairs200}", float(miss200), "", goal="0"),
    ]
    from bench import signin

    for row in await signin.run(stack):
        rows.append(Row(NAME, f"2 auth replicas: {row.metric}", row.value, row.unit, row.reference,
                        row.reference_value, row.goal))
    return rows
