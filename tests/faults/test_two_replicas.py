"""Nothing that matters lives in one process's memory: with two replicas of every service behind
nginx (round robin, so consecutive requests alternate between replicas), throttles, PIN allocation,
RFC 8628 slow_down, claim exchange and the holder kits behave exactly as with one."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from deploy.launcher import Stack
from tests.faults.test_faults import PASSWORD, Edge, sign_in, sign_up

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]
GRANT = "urn:ietf:params:oauth:grant-type:device_code"


async def served_by_both(stack: Stack, service: str) -> None:
    """Both replicas are up (otherwise these tests would prove nothing)."""
    async with aiohttp.ClientSession() as http:
        for key in stack.replica_keys(service):
            async with http.get(f"http://127.0.0.1:{stack.ports[key]}/readyz") as r:
                assert r.status == 200, key


async def test_sign_in_throttle_counts_failures_on_both_replicas(cluster: Stack) -> None:
    await served_by_both(cluster, "auth")
    async with aiohttp.ClientSession() as http:
        edge = Edge(cluster, http)
        a = await sign_up(edge)
        wrong = type(a)(a.username, "nope nope nope")
        for _ in range(6):  # five free failures, the sixth starts the block (as on one process)
            assert await sign_in(edge, wrong, "c") is None
        status, body, headers = await edge.call("POST", "/api/v2/users/signin", client="c",
                                                data={"login": a.username, "password": PASSWORD})
        assert status == 429 and body and body["errors"][0]["code"] == 1111, (status, body)  # type: ignore[index]
        assert int(headers["Retry-After"]) >= 1


async def test_pin_codes_are_unique_across_replicas(cluster: Stack) -> None:
    await served_by_both(cluster, "linkcode")
    async with aiohttp.ClientSession() as http:
        edge = Edge(cluster, http)
        answers = await asyncio.gather(*(edge.call("POST", "/api/v2/pins.json", client=f"tv-{uuid.uuid4().hex[:8]}",
                                                   data={"strong": "false"}) for _ in range(80)))
    codes = [str(b["code"]) for s, b, _ in answers if s == 201 and b]
    assert len(codes) == 80 and len(set(codes)) == 80


async def test_slow_down_is_tracked_across_replicas(cluster: Stack) -> None:
    await served_by_both(cluster, "linkcode")
    async with aiohttp.ClientSession() as http:
        async with http.post(cluster.edge_url + "/oauth/device/code", data={"client_id": "tv-app"}) as r:
            auth = await r.json()
        poll = {"grant_type": GRANT, "device_code": auth["device_code"], "client_id": "tv-app"}
        errors = []
        for _ in range(4):  # alternate replicas: each poll after the first is too fast
            async with http.post(cluster.edge_url + "/oauth/token", data=poll) as r:
                errors.append((await r.json())["error"])
    assert errors == ["authorization_pending", "slow_down", "slow_down", "slow_down"]


async def test_claim_token_is_exchanged_once_across_replicas(cluster: Stack) -> None:
    await served_by_both(cluster, "linkcode")
    async with aiohttp.ClientSession() as http:
        edge = Edge(cluster, http)
        a = await sign_up(edge)
        token = await sign_in(edge, a, "phone")
        status, body, _ = await edge.call("GET", "/api/claim/token.json", token=token)
        assert status == 200 and body
        claim = str(body["token"])
        answers = await asyncio.gather(*(edge.call("POST", f"/api/claim/exchange?token={claim}",
                                                   client=f"srv-{i}") for i in range(6)))
    statuses = sorted(s for s, _, _ in answers)
    assert statuses.count(200) == 1 and all(s == 400 for s in statuses if s != 200), statuses


async def test_sign_out_is_refused_at_once_by_every_replica(cluster: Stack) -> None:
    """Read-your-writes with replicas: the sign-out answers only once every instance of auth,
    linkcode and web that may have the token cached has applied the revocation."""
    for service in ("auth", "linkcode"):
        await served_by_both(cluster, service)
    routes = {"auth": "/api/v2/user", "linkcode": "/api/claim/token.json"}
    async with aiohttp.ClientSession() as http:
        edge = Edge(cluster, http)
        a = await sign_up(edge)

        async def statuses(token: str) -> dict[str, int]:
            out = {}
            for service, path in routes.items():
                for key in cluster.replica_keys(service):
                    async with http.get(f"http://127.0.0.1:{cluster.ports[key]}{path}",
                                        headers={"X-Plex-Token": token, "X-Plex-Client-Identifier": "c",
                                                 "Accept": "application/json"}) as r:
                        out[key] = r.status
            return out

        for trial in range(3):
            token = await sign_in(edge, a, f"device-{trial}")
            assert token
            assert set((await statuses(token)).values()) == {200}  # cached on every replica now
            status, _, _ = await edge.call("DELETE", "/api/v2/users/signout", client=f"device-{trial}", token=token)
            assert status == 204
            assert set((await statuses(token)).values()) == {401}, await statuses(token)
