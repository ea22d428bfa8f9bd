"""Link codes: PIN create -> link -> collect flows per second through the edge, beside a bare
aiohttp handler's round trips; and PIN creation latency at 10%, 50% and 90% occupancy of the
4-character code space (occupancy seeded through SQL with real code HMACs).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg

from bench.common import Row, bare_server, closed_loop, service_db, summary_ms
from deploy.launcher import Stack
from services.linkcode.service import PIN_ALPHABET
from shared import tokens
from shared.settings import decode_key

NAME = "linkcode"
CAPACITY = len(PIN_ALPHABET) ** 4


async def run(stack: Stack) -> list[Row]:
    name = f"lk{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + "/api/v2/users", data={"email": f"{name}@example.org", "username": name,
                                                                      "password": "linkcode bench 42"},
                             headers={"X-Plex-Client-Identifier": "bench", "Accept": "application/json"}) as r:
            token = (await r.json())["authToken"]

    async def flow(http: aiohttp.ClientSession, i: int) -> bool:
        cid = f"tv-{i}"
        async with http.post(stack.edge_url + "/api/v2/pins", headers={"X-Plex-Client-Identifier": cid,
                                                                        "Accept": "application/json"}) as r:
            pin = await r.json()
        async with http.put(stack.edge_url + "/api/v2/pins/link", data={"code": pin["code"]},
                            headers={"X-Plex-Token": token}) as r:
            if r.status != 204:
                return False
        async with http.get(stack.edge_url + f"/api/v2/pins/{pin['id']}",
                            headers={"X-Plex-Client-Identifier": cid, "Accept": "application/json"}) as r:
            return bool((await r.json()).get("authToken"))

    flows, _ = await closed_loop(flow, concurrency=4, seconds=8)
    async with bare_server() as bare:
        async def three(http: aiohttp.ClientSession, i: int) -> bool:
            for _ in range(3):
                async with http.get(bare + "/") as r:
                    await r.read()
            return True

        bare_rate, bare_lat = await closed_loop(three, concurrency=4, seconds=5)
    rows = [Row(NAME, "PIN create+link+collect flows", flows, "flows/s", "bare aiohttp, 3 round trips", bare_rate)]
    rows += await occupancy_rows(stack, summary_ms(bare_lat)["p50"] / 3)
    return rows


async def occupancy_rows(stack: Stack, bare_ms: float) -> list[Row]:
    key = decode_key(stack.env["TOKEN_HMAC_KEY"])
    conn = await asyncpg.connect(service_db(stack, "linkcode"))
    rows: list[Row] = []
    try:
        await conn.execute("DELETE FROM pins WHERE NOT strong")
        codes = (a + b + c + d for a in PIN_ALPHABET for b in PIN_ALPHABET for c in PIN_ALPHABET for d in PIN_ALPHABET)
        seeded = 0
        expires = datetime.now(UTC) + timedelta(hours=1)
        for pct in (10, 50, 90):
            target = CAPACITY * pct // 100
            batch = []
            while seeded + len(batch) < target:
                batch.append(tokens.digest(key, next(codes), purpose="pin"))
            for start in range(0, len(batch), 50_000):
                # ON CONFLICT: a PIN created by the measurement may already hold one of these codes
                await conn.execute(
                    "INSERT INTO pins (strong, code_hmac, client_identifier, device, expires_at)"
                    " SELECT false, h, 'seed', '{}', $2 FROM unnest($1::bytea[]) AS x(h) ON CONFLICT DO NOTHING",
                    batch[start:start + 50_000], expires)
            seeded += len(batch)
            # Fresh planner statistics, as after any bulk load: seeded at once, the table is not yet
            # analysed by autovacuum, and with a stale row count PostgreSQL may walk the expiry index
            # instead of the unique code index (measured: PIN creation p50 300 ms until autoanalyze ran).
            await conn.execute("ANALYZE pins")
            latencies = []
            async with aiohttp.ClientSession() as http:
                for i in range(150):
                    t0 = time.perf_counter()
                    async with http.post(stack.edge_url + "/api/v2/pins",
                                         headers={"X-Plex-Client-Identifier": f"occ-{pct}-{i}",
                                                  "Accept": "application/json"}) as r:
                        assert r.status == 201, await r.text()
                    latencies.append(time.perf_counter() - t0)
            s = summary_ms(latencies)
            rows.append(Row(NAME, f"PIN creation p50 at {pct}% occupancy", s["p50"], "ms", "bare aiohttp round trip",
                            bare_ms))
            rows.append(Row(NAME, f"PIN creation p99 at {pct}% occupancy", s["p99"], "ms"))
    finally:
        await conn.execute("DELETE FROM pins WHERE client_identifier = 'seed'")
        await conn.close()
    return rows
