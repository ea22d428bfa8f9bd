"""Sign-in: throughput through the edge beside raw argon2id verify throughput with the same
parameters and thread count on this machine; and the p99 of ``GET /api/v2/user`` while sign-in is
saturated (hashing must not stall auth's event loop), beside the same request on an idle service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from argon2 import PasswordHasher

from bench.common import CpuMeter, RawHttp, Row, closed_loop, histogram_totals, raw_closed_loop, summary_ms
from deploy.launcher import Stack
from shared.passwords import HashParams

NAME = "signin"
PASSWORD = "bench sign-in passphrase"
SECONDS = 24.0
ROUNDS = 8  # short alternating rounds: this shared VM's speed drifts by several percent within a minute


def raw_argon2_rate(seconds: float, threads: int = 2) -> float:
    """argon2id verifications per second, 19 MiB / 2 passes / p=1 (auth's defaults), ``threads`` at once."""
    p = HashParams()
    hasher = PasswordHasher(time_cost=p.time_cost, memory_cost=p.memory_kib, parallelism=p.parallelism,
                            hash_len=32, salt_len=16)
    phc = hasher.hash(PASSWORD)
    deadline = time.perf_counter() + seconds

    def work() -> int:
        n = 0
        while time.perf_counter() < deadline:
            try:
                hasher.verify(phc, PASSWORD)
            except Exception:  # noqa: BLE001 - a mismatch costs the same
                pass
            n += 1
        return n

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        count = sum(pool.map(lambda _: work(), range(threads)))
    return count / (time.perf_counter() - started)


CLIENTS = 16


class Alternating:
    """Rounds that alternate a sign-in load with raw argon2 verify, so slow drifts of this shared VM
    hit both alike; each round's load is ``load(seconds) -> rate``. ``meter`` counts the CPU of the
    sign-in rounds only."""

    def __init__(self, meter: CpuMeter | None = None) -> None:
        self.meter = meter
        self.signed = self.raw_count = 0
        self.signin_s = self.raw_s = self.raw_cpu = 0.0
        self.ratios: list[float] = []

    async def round(self, load: Callable[[float], Awaitable[float]]) -> None:
        if self.meter is not None:
            self.meter.resume()
        t0 = time.perf_counter()
        rate = await load(SECONDS / ROUNDS)
        elapsed = time.perf_counter() - t0
        if self.meter is not None:
            self.meter.pause()
        self.signed += round(rate * elapsed)
        self.signin_s += elapsed
        t0, c0 = time.perf_counter(), time.process_time()
        raw_rate = await asyncio.to_thread(raw_argon2_rate, SECONDS / ROUNDS)
        elapsed = time.perf_counter() - t0
        self.raw_cpu += time.process_time() - c0
        self.raw_count += round(raw_rate * elapsed)
        self.raw_s += elapsed
        self.ratios.append(rate / raw_rate)

    @property
    def rate(self) -> float:
        return self.signed / self.signin_s

    @property
    def raw(self) -> float:
        return self.raw_count / self.raw_s


async def run(stack: Stack) -> list[Row]:
    # Sixteen people signing in, each on a device of their own (the headline), and sixteen clients
    # on one account (at most the account's free failures + 1 are hashed at once: the rest wait).
    names = [f"bench{int(time.time())}x{i}" for i in range(CLIENTS)]
    name = names[0]
    async with aiohttp.ClientSession() as http:
        for each in names:
            async with http.post(stack.edge_url + "/api/v2/users",
                                 data={"email": f"{each}@example.org", "username": each, "password": PASSWORD},
                                 headers={"X-Plex-Client-Identifier": "bench", "Accept": "application/json"}) as r:
                token = (await r.json())["authToken"]

    async def signin(http: aiohttp.ClientSession, i: int) -> bool:
        async with http.post(stack.edge_url + "/api/v2/users/signin", data={"login": names[i % CLIENTS],
                                                                             "password": PASSWORD},
                             headers={"X-Plex-Client-Identifier": f"bench-{i % 50}", "Accept": "application/json"}) as r:
            await r.read()
            return r.status == 201

    async def get_user(http: aiohttp.ClientSession, i: int) -> bool:
        async with http.get(stack.edge_url + "/api/v2/user", headers={"X-Plex-Token": token,
                                                                      "Accept": "application/json"}) as r:
            await r.read()
            return r.status == 200

    async def probe(seconds: float) -> list[float]:
        """GET /api/v2/user 50 times a second (a paced probe: a closed loop would itself load the cores)."""
        latencies: list[float] = []
        async with aiohttp.ClientSession() as http:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                assert await get_user(http, 0)
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - t0)))
        return latencies

    # The load itself comes from prepared requests on plain keep-alive connections (RawHttp): an
    # aiohttp client costs ~0.7 ms of CPU per request, taken from the same 2 cores.
    from urllib.parse import urlencode

    def prepare(logins: list[str]) -> list[bytes]:
        """48 requests, 3 devices per client; client ``w`` of the closed loop always sends ``logins[w % n]``."""
        return [RawHttp(stack.edge_url).prepare("POST", "/api/v2/users/signin", {
            "X-Plex-Client-Identifier": f"bench-{i}", "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded"},
            urlencode({"login": logins[i % CLIENTS % len(logins)], "password": PASSWORD}).encode())
            for i in range(3 * CLIENTS)]

    prepared = prepare(names)
    one_account = prepare([name])
    idle = await probe(3)
    # One client at a time: nothing else is hashing, so the mint goes at once (no batching wait).
    alone: list[float] = []
    async with aiohttp.ClientSession() as http:
        for i in range(40):
            t0 = time.perf_counter()
            assert await signin(http, i)
            alone.append(time.perf_counter() - t0)
    one_verify = 1000 / await asyncio.to_thread(raw_argon2_rate, 1.0, 1)
    await closed_loop(signin, concurrency=CLIENTS, seconds=2)  # warm-up: devices exist, pools are full
    # Throughput on its own (the probe below would take its share of the 2 cores), with the CPU each
    # kind of process spends per sign-in. Rounds alternate sign-in and raw argon2, so slow drifts of
    # this shared VM hit both alike.
    meter = CpuMeter()
    minted0, calls0 = await histogram_totals(stack.url("auth"), "hearth_auth_mint_batch_size")
    rounds = Alternating(meter)
    for _ in range(ROUNDS):
        await rounds.round(lambda seconds: raw_closed_loop(stack.edge_url, prepared, expect=201,
                                                           concurrency=CLIENTS, seconds=seconds))
    cpu = meter.seconds
    minted1, calls1 = await histogram_totals(stack.url("auth"), "hearth_auth_mint_batch_size")
    rate, raw, count, ratios, raw_cpu, raw_count = (rounds.rate, rounds.raw, rounds.signed, rounds.ratios,
                                                    rounds.raw_cpu, rounds.raw_count)
    # The same load on one account, in its own alternating rounds.
    one = Alternating()
    for _ in range(ROUNDS // 2):
        await one.round(lambda seconds: raw_closed_loop(stack.edge_url, one_account, expect=201,
                                                        concurrency=CLIENTS, seconds=seconds))
    # Then the probe while sign-in is saturated again.
    user_task = asyncio.create_task(probe(SECONDS / 2))
    await closed_loop(signin, concurrency=CLIENTS, seconds=SECONDS / 2)
    loaded = await user_task
    rows = [
        Row(NAME, "sign-in throughput (edge, 16 clients, 16 accounts)", rate, "sign-ins/s",
            "raw argon2id verify, 2 threads", raw, "ratio >= 0.9"),
        Row(NAME, f"  lowest round's ratio (of {ROUNDS} alternating rounds)", min(ratios), "ratio",
            "highest round's ratio", max(ratios)),
        Row(NAME, "sign-in throughput (16 clients, one account)", one.rate, "sign-ins/s",
            "raw argon2id verify, 2 threads", one.raw),
        Row(NAME, "CPU per verify: raw argon2id (bench process)", raw_cpu / raw_count * 1000, "ms"),
        Row(NAME, "sessions per devicesession mint call (batching)", (minted1 - minted0) / max(1.0, calls1 - calls0),
            "sessions"),
        Row(NAME, "sign-in p50, one client at a time", summary_ms(alone[5:])["p50"], "ms",
            "one raw argon2id verify (1 thread)", one_verify),
        Row(NAME, "GET /api/v2/user p99 during sign-in load (50/s probe)", summary_ms(loaded)["p99"], "ms",
            "same request, idle service p99", summary_ms(idle)["p99"], "< 20 ms"),
        Row(NAME, "GET /api/v2/user p50 during sign-in load", summary_ms(loaded)["p50"], "ms",
            "same request, idle service p50", summary_ms(idle)["p50"]),
    ]
    rows += [Row(NAME, f"CPU per sign-in: {label}", seconds / count * 1000, "ms") for label, seconds in cpu.items()
             if seconds / count >= 0.00005]
    return rows
