"""Fan-out: 20 sample holders, 1,000 accounts with 5 sessions each, 200 password changes with
sign-out. For every (revocation, holder) pair: the time from the password-change HTTP response to
the holder having evicted the old tokens (its ``revocation.applied`` timestamp: the kit evicts,
then acknowledges), beside the broker's own produce-to-consume latency in the same run. Then:
introspection throughput on cache misses beside a bare aiohttp handler, and the kit's cached
``validate`` rate beside a bare dict lookup of the same keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
from aiokafka import ConsumerRecord, TopicPartition

from bench.common import Row, bare_server, broker_round_trip, closed_loop, service_db, summary_ms
from deploy.launcher import Stack
from shared import tokens
from shared.consumer import ConsumeLoop
from shared.events import REVOCATIONS_APPLIED, Envelope, parse_time
from shared.holder import HolderKit, holder_secret
from shared.passwords import Passwords
from shared.settings import decode_key

NAME = "fanout"
ACCOUNTS = 1000
SESSIONS = 5
CHANGES = 200
PASSWORD = "bench password 2026"


async def seed(stack: Stack) -> dict[str, list[str]]:
    """1,000 accounts (auth) with 5 sessions each (devicesession), through SQL; returns tokens."""
    pw = Passwords()
    record = await pw.hash(PASSWORD)
    pw.close()
    key = decode_key(stack.env["TOKEN_HMAC_KEY"])
    tag = uuid.uuid4().hex[:6]
    ids = [uuid.uuid4() for _ in range(ACCOUNTS)]
    auth = await asyncpg.connect(service_db(stack, "auth"))
    try:
        await auth.execute(
            "INSERT INTO accounts (id, email, email_norm, username, username_norm, password_hash)"
            " SELECT i, 'fan' || n || $2 || '@example.org', 'fan' || n || $2 || '@example.org', 'fan' || n || $2,"
            " 'fan' || n || $2, $3 FROM unnest($1::uuid[]) WITH ORDINALITY AS x(i, n)", ids, tag, record)
    finally:
        await auth.close()
    plain: dict[str, list[str]] = {}
    rows_dev, rows_ses = [], []
    for a in ids:
        plain[str(a)] = []
        for s in range(SESSIONS):
            t = tokens.new_token(tokens.SESSION_TOKEN_BYTES)
            plain[str(a)].append(t)
            rows_dev.append((a, f"bench-{s}"))
            rows_ses.append((uuid.uuid4(), tokens.digest(key, t, purpose="session"), a, f"bench-{s}"))
    ds = await asyncpg.connect(service_db(stack, "devicesession"))
    try:
        await ds.execute(
            "INSERT INTO devices (account_id, client_identifier, product, device_name)"
            " SELECT a, c, 'Bench Player', c FROM unnest($1::uuid[], $2::text[]) AS x(a, c)",
            [r[0] for r in rows_dev], [r[1] for r in rows_dev])
        await ds.execute(
            "INSERT INTO sessions (id, token_hmac, account_id, device_id)"
            " SELECT s, h, a, d.id FROM unnest($1::uuid[], $2::bytea[], $3::uuid[], $4::text[]) AS x(s, h, a, c)"
            " JOIN devices d ON d.account_id = x.a AND d.client_identifier = x.c",
            [r[0] for r in rows_ses], [r[1] for r in rows_ses], [r[2] for r in rows_ses], [r[3] for r in rows_ses])
    finally:
        await ds.close()
    return plain


async def warm_holders(stack: Stack, holders: Iterable[str], token_sets: list[list[str]]) -> None:
    """Every instance of every holder validates (and caches) every token that will be revoked."""
    ports = [p for h in holders for p in stack.holder_ports(h)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        sem = asyncio.Semaphore(48)

        async def get(port: int, token: str) -> None:
            async with sem, http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": token}) as r:
                assert r.status == 200, r.status

        await asyncio.gather(*(get(p, t) for p in ports for ts in token_sets for t in ts))


Instance = tuple[str, str]  # (holder id, instance id), as a revocation.applied event names them


def instances(stack: Stack, holders: Iterable[str]) -> set[Instance]:
    """Every running instance of ``holders``."""
    return {(h, stack.instance_id(k)) for h in holders for k in stack.holder_keys(h)}


@dataclass(frozen=True)
class Fanout:
    """Per (revocation, holder instance) pair that was acknowledged: seconds from the password
    change's response, and from its request, to that instance's ``revocation.applied``."""

    from_response: list[float]
    from_request: list[float]
    missing: int
    pairs: int
    answered: list[float]  # per change: seconds from its request to its response


async def change_and_wait(stack: Stack, plain: dict[str, list[str]], accounts: list[str],
                          expected: set[Instance]) -> Fanout:
    """Change the passwords of ``accounts`` with "sign out connected devices" (each keeps its first
    token), then wait up to 30 s for every instance in ``expected`` to acknowledge each revocation."""
    acks: dict[str, dict[Instance, float]] = {}

    async def on_records(tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        for rec in records:
            env = Envelope.decode(rec.value)
            who = (str(env.data["holder_id"]), str(env.data.get("instance_id", "")))
            acks.setdefault(env.data["revocation_id"], {})[who] = parse_time(env.data["applied_at"]).timestamp()

    loop = ConsumeLoop(bootstrap=stack.kafka_bootstrap, topics=[stack.topic_prefix + REVOCATIONS_APPLIED],
                       on_records=on_records, fetch_max_wait_ms=20, poll_timeout_ms=100, name="bench-acks")
    loop.start()
    responses: dict[str, tuple[float, float]] = {}  # event id -> (request sent, response received), epoch
    try:
        await asyncio.wait_for(loop.started.wait(), 60)
        async with aiohttp.ClientSession() as http:
            # One change at a time: each costs two argon2 operations (both cores for ~60 ms); running
            # them concurrently measures argon2 queueing on a 2-core machine, not the fan-out.
            for a in accounts:
                sent = time.time()
                async with http.put(stack.edge_url + "/api/v2/user/password",
                                    data={"currentPassword": PASSWORD, "password": PASSWORD + " new",
                                          "signOutDevices": "true"},
                                    headers={"X-Plex-Token": plain[a][0], "Accept": "application/json"}) as r:
                    assert r.status == 204, await r.text()
                    responses[r.headers["X-Hearth-Event-Id"]] = (sent, time.time())
        ds = await asyncpg.connect(service_db(stack, "devicesession"))
        try:
            rows = await ds.fetch(
                "SELECT id, causing_event_id FROM revocations WHERE causing_event_id = ANY($1::uuid[])",
                [uuid.UUID(e) for e in responses])
        finally:
            await ds.close()
        rev_to_event = {str(r["id"]): str(r["causing_event_id"]) for r in rows}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(expected <= set(acks.get(r, {})) for r in rev_to_event):
            await asyncio.sleep(0.2)
    finally:
        await loop.stop(wait=2)
    from_response: list[float] = []
    from_request: list[float] = []
    missing = 0
    for rid, eid in rev_to_event.items():
        sent, answered = responses[eid]
        for who in expected:
            applied = acks.get(rid, {}).get(who)
            if applied is None:
                missing += 1
                continue
            from_response.append(max(0.0, applied - answered))
            from_request.append(applied - sent)
    return Fanout(from_response, from_request, missing, len(rev_to_event) * len(expected),
                  [answered - sent for sent, answered in responses.values()])


async def run(stack: Stack) -> list[Row]:
    holders = list(stack.holders)
    plain = await seed(stack)
    accounts = list(plain)[:CHANGES]
    await warm_holders(stack, holders, [plain[a][1:] for a in accounts])
    fan = await change_and_wait(stack, plain, accounts, instances(stack, holders))
    # correctness spot check: old tokens are refused by every holder, the kept one accepted
    async with aiohttp.ClientSession() as http:
        for a in accounts[:5]:
            for h in holders:
                port = stack.ports[f"holder:{h}"]
                async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": plain[a][1]}) as r:
                    assert r.status == 401
                async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": plain[a][0]}) as r:
                    assert r.status == 200
    ref = summary_ms(await broker_round_trip(stack.kafka_bootstrap))
    resp = summary_ms(fan.from_response)
    req = summary_ms(fan.from_request)
    ref_name = "broker produce->consume"
    rows_out = [
        Row(NAME, f"response->holder evicted p50 ({len(holders)} holders)", resp["p50"], "ms", ref_name + " p50",
            ref["p50"]),
        Row(NAME, "response->holder evicted p95", resp["p95"], "ms", ref_name + " p95", ref["p95"]),
        Row(NAME, "response->holder evicted p99", resp["p99"], "ms", ref_name + " p99", ref["p99"], "p99 < 100 ms"),
        Row(NAME, "response->holder evicted max", resp["max"], "ms", ref_name + " max", ref["max"]),
        Row(NAME, "request sent->holder evicted p50 (two argon2 operations included)", req["p50"], "ms",
            ref_name + " p50", ref["p50"]),
        Row(NAME, "request sent->holder evicted p99", req["p99"], "ms", ref_name + " p99", ref["p99"]),
        Row(NAME, "request sent->response (sign-out) p50", summary_ms(fan.answered)["p50"], "ms"),
        Row(NAME, f"(revocation, holder) pairs missing of {fan.pairs}", float(fan.missing), "", goal="0"),
    ]
    rows_out += await introspection_rows(stack, plain)
    rows_out += await kit_rows(stack, plain)
    return rows_out


async def introspection_rows(stack: Stack, plain: dict[str, list[str]]) -> list[Row]:
    live = [t for ts in list(plain.values())[CHANGES:] for t in ts]
    auth = aiohttp.BasicAuth("bench", holder_secret(stack.env["HOLDER_SECRET"], "bench"))
    url = stack.url("devicesession") + "/oauth/introspect"

    async def introspect(http: aiohttp.ClientSession, i: int) -> bool:
        async with http.post(url, data={"token": live[i % len(live)]}, auth=auth) as r:
            return (await r.json())["active"] is True

    rate, lat = await closed_loop(introspect, concurrency=16, seconds=6)
    async with bare_server() as bare:
        async def hello(http: aiohttp.ClientSession, i: int) -> bool:
            async with http.post(bare + "/introspect", data={"token": live[i % len(live)]}) as r:
                return (await r.json())["active"] is True

        bare_rate, bare_lat = await closed_loop(hello, concurrency=16, seconds=6)
    return [
        Row(NAME, "introspection (cache miss, DB lookup)", rate, "req/s", "bare aiohttp handler", bare_rate),
        Row(NAME, "introspection p99", summary_ms(lat)["p99"], "ms", "bare aiohttp handler p99",
            summary_ms(bare_lat)["p99"]),
    ]


async def kit_rows(stack: Stack, plain: dict[str, list[str]]) -> list[Row]:
    kit = HolderKit(holder_id="bench-kit", introspect_url=stack.url("devicesession") + "/oauth/introspect",
                    holder_secret=holder_secret(stack.env["HOLDER_SECRET"], "bench-kit"),
                    bootstrap=stack.kafka_bootstrap, topic_prefix=stack.topic_prefix)
    await kit.start()
    try:
        await asyncio.wait_for(kit.assigned.wait(), 30)
        sample = [t for ts in list(plain.values())[CHANGES:CHANGES + 200] for t in ts]
        for t in sample:
            assert await kit.validate(t) is not None
        n = 200_000
        t0 = time.perf_counter()
        for i in range(n):
            await kit.validate(sample[i % len(sample)])
        kit_rate = n / (time.perf_counter() - t0)
        table: dict[bytes, Any] = {hashlib.sha256(t.encode()).digest(): t for t in sample}
        t0 = time.perf_counter()
        for i in range(n):
            table.get(hashlib.sha256(sample[i % len(sample)].encode()).digest())
        dict_rate = n / (time.perf_counter() - t0)
    finally:
        await kit.stop()
    return [Row(NAME, "kit validate() cached", kit_rate, "calls/s", "sha256 + dict lookup", dict_rate)]

