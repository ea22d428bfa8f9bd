"""Sign-in of accounts with two-step verification (password + current TOTP code in ``verificationCode``)
through the edge, beside raw argon2id verify throughput measured in alternating rounds of the same run.

A code is accepted once per account and time step (replay protection), so every sign-in here uses an
account of its own: the accounts are copies of one signed-up account (same peppered argon2id hash,
so each sign-in costs exactly one verify) with two-step verification on, written straight into auth's
database with their secrets sealed under the stack's TWO_FACTOR_SEAL_KEYS, as auth would.
"""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlencode

import aiohttp
import asyncpg
import pyotp

from bench.common import CpuMeter, RawHttp, Row, raw_closed_loop
from bench.signin import Alternating
from deploy.launcher import Stack
from shared.crypto import Sealer
from shared.settings import with_database

NAME = "two_factor"
PASSWORD = "bench two-factor passphrase"
SECONDS = 24.0
ROUNDS = 8
PER_ROUND = 900  # more accounts than one round signs in (no account is used twice)
WARMUP = 300


async def _accounts(stack: Stack, secret: str, count: int) -> list[str]:
    name = f"tfbench{int(time.time())}"
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + "/api/v2/users", data={
                "email": f"{name}@example.org", "username": name, "password": PASSWORD},
                headers={"X-Plex-Client-Identifier": "bench", "Accept": "application/json"}) as r:
            assert r.status == 201, await r.text()
    db = with_database(stack.database_url, f"{stack.env.get('DB_NAME_PREFIX', '')}hearth_auth")
    conn = await asyncpg.connect(db)
    sealer = Sealer(stack.env["TWO_FACTOR_SEAL_KEYS"])
    try:
        password_hash = await conn.fetchval("SELECT password_hash FROM accounts WHERE username_norm = $1", name)
        ids = [uuid.uuid4() for _ in range(count)]
        names = [f"{name}x{i}" for i in range(count)]
        await conn.copy_records_to_table("accounts", records=[
            (i, f"{n}@example.org", f"{n}@example.org", n, n, password_hash) for i, n in zip(ids, names, strict=True)],
            columns=["id", "email", "email_norm", "username", "username_norm", "password_hash"])
        await conn.copy_records_to_table("two_factor", records=[
            (i, sealer.seal(secret, context=f"two-factor:{i}"), time_now()) for i in ids],
            columns=["account_id", "sealed_secret", "enabled_at"])
        await conn.execute("ANALYZE accounts; ANALYZE two_factor")
    finally:
        await conn.close()
    return names


def time_now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _prepared(stack: Stack, names: list[str], secret: str) -> list[bytes]:
    code = pyotp.TOTP(secret).now()
    return [RawHttp(stack.edge_url).prepare("POST", "/api/v2/users/signin", {
        "X-Plex-Client-Identifier": f"tfbench-{i % 50}", "Accept": "application/json",
        "Content-Type": "application/x-www-form-urlencoded"},
        urlencode({"login": n, "password": PASSWORD, "verificationCode": code}).encode())
        for i, n in enumerate(names)]


async def run(stack: Stack) -> list[Row]:
    secret = pyotp.random_base32(32)
    names = await _accounts(stack, secret, WARMUP + PER_ROUND * ROUNDS)
    # warm-up: pools full, devices known
    await raw_closed_loop(stack.edge_url, _prepared(stack, names[:WARMUP], secret), expect=201, concurrency=16,
                          seconds=2)
    rounds = Alternating(CpuMeter())
    for k in range(ROUNDS):
        batch = names[WARMUP + k * PER_ROUND: WARMUP + (k + 1) * PER_ROUND]
        prepared = _prepared(stack, batch, secret)
        before = rounds.signed
        await rounds.round(lambda seconds, prepared=prepared: raw_closed_loop(  # type: ignore[misc]
            stack.edge_url, prepared, expect=201, concurrency=16, seconds=seconds))
        assert rounds.signed - before < PER_ROUND, "a round signed in more accounts than it had: raise PER_ROUND"
    ratios = rounds.ratios
    rate, raw = rounds.rate, rounds.raw
    rows = [
        Row(NAME, "2FA sign-in throughput (password + TOTP, edge, 16 clients)", rate, "sign-ins/s",
            "raw argon2id verify, 2 threads", raw, "ratio >= 0.9"),
        Row(NAME, f"  lowest round's ratio (of {ROUNDS} alternating rounds)", min(ratios), "ratio",
            "highest round's ratio", max(ratios)),
    ]
    assert rounds.meter is not None
    return rows + [Row(NAME, f"CPU per 2FA sign-in: {label}", seconds / rounds.signed * 1000, "ms")
                   for label, seconds in rounds.meter.seconds.items() if seconds / rounds.signed >= 0.00005]
