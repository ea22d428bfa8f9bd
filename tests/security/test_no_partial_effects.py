"""Issue 16, finding 5: a request that fails leaves nothing half done, and the same request
succeeds when retried. Each route that calls another service is tried while that service is down
(really stopped, then started again)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from deploy.launcher import Stack
from tests.auth.test_auth import PASSWORD, sign_in, sign_up
from tests.security.helpers import CSRF, call, db, fresh_address, session_from

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]


@contextlib.asynccontextmanager
async def down(stack: Stack, service: str) -> AsyncIterator[None]:
    """``service`` stopped for the duration of the block, then started again and ready."""
    child = next(c for c in stack.children if c.name == service)
    await asyncio.to_thread(child.stop)
    stack.children.remove(child)
    try:
        yield
    finally:
        new = stack.start_service(service)
        await asyncio.to_thread(stack.wait_ready, stack.ports[service], service, new)


async def test_requests_failing_inside_an_internal_call_leave_nothing_and_succeed_when_retried(
        stack: Stack) -> None:
    source = fresh_address()
    name = f"p{uuid.uuid4().hex[:10]}"
    signup = {"email": f"{name}@example.org", "username": name, "password": PASSWORD}
    web_name = f"w{uuid.uuid4().hex[:10]}"
    owner = await sign_up(stack)
    status, body, _ = await sign_in(stack, owner["username"], client=f"o-{uuid.uuid4().hex[:6]}")
    token = body["authToken"]
    status, claim, _ = await call(stack, "GET", "/api/claim/token.json", headers={"X-Plex-Token": token})
    cid = f"tv-{uuid.uuid4().hex[:8]}"
    status, pin, _ = await call(stack, "POST", "/api/v2/pins", headers={"X-Plex-Client-Identifier": cid})
    assert status == 201
    # The web sign-up form, loaded before the outage.
    browser = session_from(source)
    async with browser.get(stack.edge_url + "/signup") as r:
        csrf = CSRF.search(await r.text()).group(1)  # type: ignore[union-attr]
    server = {"X-Plex-Client-Identifier": f"srv-{uuid.uuid4().hex[:8]}", "X-Plex-Product": "Plex Media Server"}
    status, body, _ = await sign_in(stack, owner["username"], client=f"o2-{uuid.uuid4().hex[:6]}")
    second = body["authToken"]
    assert (await call(stack, "GET", "/api/v2/user", headers={"X-Plex-Token": second}))[0] == 200  # cached by auth
    status, dc, _ = await call(stack, "POST", "/oauth/device/code", data={"client_id": "partial-tv"})
    assert status == 200
    try:
        async with down(stack, "devicesession"):
            # sign-up: auth -> devicesession (first session)
            status, body, _ = await call(stack, "POST", "/api/v2/users", source=source, data=signup)
            assert status == 503 and body["errors"][0]["code"] == 1094, body
            # sign-up through the web pages: web -> auth -> devicesession
            async with browser.post(stack.edge_url + "/signup", allow_redirects=False, data={
                    "csrf_token": csrf, "email": f"{web_name}@example.org", "username": web_name,
                    "password": PASSWORD}) as r:
                assert r.status >= 400 and r.status != 500
            # sign-in: auth -> devicesession
            status, _, _ = await call(stack, "POST", "/api/v2/users/signin", source=source,
                                      data={"login": owner["username"], "password": PASSWORD})
            assert status == 503
            # claim exchange: linkcode -> devicesession
            status, body, _ = await call(stack, "POST", f"/api/claim/exchange?token={claim['token']}", headers=server)
            assert status == 503, body
            # sign-out: auth -> devicesession (revoke)
            status, body, _ = await call(stack, "DELETE", "/api/v2/users/signout", headers={"X-Plex-Token": second})
            assert status == 503, body
            # device code approval: linkcode -> devicesession (mint)
            status, body, _ = await call(stack, "PUT", "/api/v2/pins/link", data={"code": dc["user_code"]},
                                         headers={"X-Plex-Token": token})
            assert status == 503, body
        auth = await db(stack, "auth")
        try:
            assert await auth.fetchval("SELECT count(*) FROM accounts WHERE username IN ($1, $2)", name, web_name) == 0
        finally:
            await auth.close()

        # Retried once the dependency is back, each succeeds (no 409, no used-up token).
        status, body, _ = await call(stack, "POST", "/api/v2/users", source=source, data=signup)
        assert status == 201 and body["authToken"], body
        async with browser.get(stack.edge_url + "/signup") as r:
            csrf = CSRF.search(await r.text()).group(1)  # type: ignore[union-attr]
        async with browser.post(stack.edge_url + "/signup", allow_redirects=False, data={
                "csrf_token": csrf, "email": f"{web_name}@example.org", "username": web_name,
                "password": PASSWORD}) as r:
            assert r.status == 303, await r.text()
        status, _, _ = await call(stack, "POST", "/api/v2/users/signin", source=source,
                                  data={"login": owner["username"], "password": PASSWORD})
        assert status == 201
        status, body, _ = await call(stack, "POST", f"/api/claim/exchange?token={claim['token']}", headers=server)
        assert status == 200 and body["authToken"], body
        status, _, _ = await call(stack, "DELETE", "/api/v2/users/signout", headers={"X-Plex-Token": second})
        assert status == 204
        status, _, _ = await call(stack, "PUT", "/api/v2/pins/link", data={"code": dc["user_code"]},
                                  headers={"X-Plex-Token": token})
        assert status == 204
        status, body, _ = await call(stack, "POST", "/oauth/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": dc["device_code"],
            "client_id": "partial-tv"})
        assert status == 200 and body["access_token"], body

        # A PIN link that fails (linkcode -> devicesession) leaves the PIN linkable.
        async with down(stack, "devicesession"):
            status, _, _ = await call(stack, "PUT", "/api/v2/pins/link", data={"code": pin["code"]},
                                      headers={"X-Plex-Token": token})
            assert status in (401, 503)  # 401 when linkcode's holder cannot introspect the caller either
        status, _, _ = await call(stack, "PUT", "/api/v2/pins/link", data={"code": pin["code"]},
                                  headers={"X-Plex-Token": token})
        assert status == 204

        # A claim exchange whose account lookup fails (linkcode -> auth) keeps the token, and
        # the session it had minted meanwhile is revoked.
        status, claim2, _ = await call(stack, "GET", "/api/claim/token.json", headers={"X-Plex-Token": token})
        async with down(stack, "auth"):
            status, body, _ = await call(stack, "POST", f"/api/claim/exchange?token={claim2['token']}",
                                         headers=server)
            assert status == 503, body
        status, body, _ = await call(stack, "POST", f"/api/claim/exchange?token={claim2['token']}", headers=server)
        assert status == 200, body
    finally:
        await browser.close()


async def test_an_unreachable_service_is_a_503_in_the_routes_shape_with_cors(stack: Stack) -> None:
    """nginx's own answer when no replica of a service can be reached: 503 (retry), in the route
    family's error shape, and on Plex routes with Access-Control-Allow-Origin like every answer."""
    import aiohttp

    async with down(stack, "auth"), aiohttp.ClientSession() as http:
        async with http.get(stack.edge_url + "/api/v2/user", headers={"Origin": "https://app.example"}) as r:
            body = await r.text()
            assert r.status == 503 and 'code="1094"' in body, (r.status, body)
            assert r.headers["Access-Control-Allow-Origin"] == "*" and r.headers["Retry-After"] == "1"
        async with http.get(stack.edge_url + "/users/account.json") as r:
            assert r.status == 503
