"""Sign-in's batched session minting, against the real devicesession of the stack and through the edge."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from bench.common import histogram_totals
from deploy.launcher import Stack
from services.auth.minting import MintBatcher
from shared.errors import HearthError
from shared.internal import InternalClient
from tests.auth.test_auth import PASSWORD, sign_in, sign_up, user_status

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]


def mint_body(account: str, client: str, **extra: object) -> dict[str, object]:
    return {"account_id": account, "client_identifier": client, "kind": "app", **extra}


async def test_mints_held_while_others_hash_go_as_one_call_and_fail_alone(stack: Stack) -> None:
    client = InternalClient(stack.url("devicesession"), stack.env["INTERNAL_API_SECRET"])
    hashing = 1
    batcher = MintBatcher(client, window=5.0, busy=lambda: hashing)
    try:
        acct = str(uuid.uuid4())
        started = time.perf_counter()
        tasks = [asyncio.create_task(batcher.mint(mint_body(acct, f"dev-{i}"))) for i in range(3)]
        bad = asyncio.create_task(batcher.mint(mint_body(acct, "bad", kind="toaster")))
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in tasks) and batcher.calls == 0  # held: a hash is still running
        hashing = 0
        batcher.settled()  # the last hash finished: send now, long before the 5 s window
        answers = await asyncio.gather(*tasks)
        with pytest.raises(HearthError) as refused:
            await bad
        assert time.perf_counter() - started < 2.0
        assert batcher.calls == 1
        assert (refused.value.status, refused.value.code, refused.value.field) == (400, "invalid_request", "kind")
        assert len({a["token"] for a in answers}) == 3 and len({a["device_id"] for a in answers}) == 3

        # Nothing else hashing: a mint goes at once, alone, on the single-session route.
        t0 = time.perf_counter()
        alone = await batcher.mint(mint_body(acct, "alone"))
        assert time.perf_counter() - t0 < 1.0 and batcher.calls == 2 and alone["token"]

        # Still hashing and nothing finishes: the window bounds the wait.
        hashing = 1
        waiting = MintBatcher(client, window=0.3, busy=lambda: hashing)
        t0 = time.perf_counter()
        pair = await asyncio.gather(waiting.mint(mint_body(acct, "w1")), waiting.mint(mint_body(acct, "w2")))
        assert 0.25 < time.perf_counter() - t0 < 2.0 and waiting.calls == 1 and pair[0]["token"] != pair[1]["token"]

        # devicesession unreachable: every sign-in in the batch gets the error.
        dead = MintBatcher(InternalClient("http://127.0.0.1:9", "x", timeout=2), window=0.05, busy=lambda: 1)
        results = await asyncio.gather(dead.mint(mint_body(acct, "x1")), dead.mint(mint_body(acct, "x2")),
                                       return_exceptions=True)
        assert [getattr(r, "status", None) for r in results] == [503, 503]
    finally:
        await batcher.close()
        await client.close()


async def test_concurrent_sign_ins_share_mint_calls_and_each_gets_its_own_session(stack: Stack) -> None:
    a = await sign_up(stack)
    sum0, count0 = await histogram_totals(stack.url("auth"), "hearth_auth_mint_batch_size")
    results = await asyncio.gather(*(sign_in(stack, a["username"], PASSWORD, client=f"tv-{i % 6}")
                                     for i in range(12)))
    assert [status for status, _, _ in results] == [201] * 12
    tokens = [body["authToken"] for _, body, _ in results]
    assert len(set(tokens)) == 12
    for token in tokens:
        assert await user_status(stack, token) == 200
    sum1, count1 = await histogram_totals(stack.url("auth"), "hearth_auth_mint_batch_size")
    assert sum1 - sum0 == 12
    assert count1 - count0 < 12  # some sign-ins shared a devicesession call
