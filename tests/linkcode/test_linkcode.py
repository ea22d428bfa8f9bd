"""linkcode through the edge on the real stack: python-plexapi PIN login, RFC 8628, server claim."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import aiohttp
import asyncpg
import pytest
from plexapi.myplex import MyPlexAccount, MyPlexPinLogin

from deploy.launcher import Stack
from services.linkcode.service import PIN_ALPHABET
from shared.settings import with_database
from tests.auth.test_auth import PASSWORD, sign_in, sign_up, user_status
from tests.conftest import edge_json, eventually
from tests.plexclient import plex_session

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]
GRANT = "urn:ietf:params:oauth:grant-type:device_code"


async def signed_in(stack: Stack, client: str = "phone") -> tuple[dict, str]:  # type: ignore[type-arg]
    a = await sign_up(stack)
    status, body, _ = await sign_in(stack, a["username"], client=client)
    assert status == 201
    return a, body["authToken"]


async def linkcode_db(stack: Stack) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(stack.database_url,
                                               f"{stack.extra_env['DB_NAME_PREFIX']}hearth_linkcode"))


async def link(stack: Stack, token: str, code: str) -> tuple[int, object]:
    status, body, _ = await edge_json(stack, "PUT", "/api/v2/pins/link", data={"code": code},
                                      headers={"X-Plex-Token": token, "X-Plex-Product": "Plex SSO"})
    return status, body


async def test_python_plexapi_pin_login_link_and_device_list(stack: Stack) -> None:
    a, _ = await signed_in(stack)
    account = await asyncio.to_thread(MyPlexAccount, a["username"], PASSWORD, session=plex_session(stack.edge_url))
    cid = f"roku-{uuid.uuid4().hex[:8]}"
    headers = {"X-Plex-Client-Identifier": cid, "X-Plex-Product": "Plex for Roku", "X-Plex-Device-Name": "Living room",
               "X-Plex-Platform": "Roku", "X-Plex-Provides": "player"}
    login = MyPlexPinLogin(session=plex_session(stack.edge_url), headers=headers)
    code = await asyncio.to_thread(lambda: login.pin)
    assert len(code) == 4 and all(c in PIN_ALPHABET for c in code)
    login.run(timeout=60)
    await asyncio.to_thread(account.link, code.lower())
    assert await asyncio.to_thread(login.waitForLogin)
    token = login.token
    device_view = await asyncio.to_thread(MyPlexAccount, token=token, session=plex_session(stack.edge_url))
    device = await asyncio.to_thread(device_view.device, clientId=cid)
    assert device.token == token and device.product == "Plex for Roku" and device.name == "Living room"
    owner_view = await asyncio.to_thread(account.devices)
    assert cid in {d.clientIdentifier for d in owner_view}
    assert await user_status(stack, token) == 200
    # delivered once: the PIN is done
    status, _, _ = await edge_json(stack, "GET", f"/api/v2/pins/{login._id}", headers={"X-Plex-Client-Identifier": cid})
    assert status == 404
    # removing the device through python-plexapi signs it out
    mine = await asyncio.to_thread(account.device, clientId=cid)
    await asyncio.to_thread(mine.delete)
    await eventually(lambda: user_status_is(stack, token, 401), timeout=2)


async def user_status_is(stack: Stack, token: str, status: int) -> bool:
    return await user_status(stack, token) == status


async def test_expired_pin_makes_the_poller_stop(stack: Stack) -> None:
    login = MyPlexPinLogin(session=plex_session(stack.edge_url),
                           headers={"X-Plex-Client-Identifier": f"tv-{uuid.uuid4().hex[:6]}"})
    await asyncio.to_thread(lambda: login.pin)
    login.run(timeout=60)
    conn = await linkcode_db(stack)
    try:
        await conn.execute("UPDATE pins SET expires_at = now() - interval '1 second' WHERE id = $1", int(login._id))
    finally:
        await conn.close()
    assert await asyncio.to_thread(login.waitForLogin) is False
    assert login.expired is True


async def test_strong_pin_and_home_assistant_style_form_headers(stack: Stack) -> None:
    _, token = await signed_in(stack)
    cid = f"ha-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + "/api/v2/pins.json",
                             data={"strong": "true", "X-Plex-Client-Identifier": cid,
                                   "X-Plex-Product": "Home Assistant", "X-Plex-Device-Name": "HA"}) as r:
            assert r.status == 201 and r.content_type == "application/json"
            pin = await r.json()
    assert isinstance(pin["id"], int) and len(pin["code"]) == 25 and pin["clientIdentifier"] == cid
    assert pin["authToken"] is None and "authToken" in pin and pin["expiresIn"] == 900
    assert pin["product"] == "Home Assistant" and pin["trusted"] is False and "location" in pin
    status, body, _ = await edge_json(stack, "GET", f"/api/v2/pins/{pin['id']}.json",
                                      headers={"X-Plex-Client-Identifier": cid})
    assert status == 200 and body["authToken"] is None
    assert (await link(stack, token, pin["code"].lower()))[0] == 204
    status, body, _ = await edge_json(stack, "GET", f"/api/v2/pins/{pin['id']}", headers={"X-Plex-Client-Identifier":
                                                                                             "someone-else"})
    assert status == 404  # only the creator collects
    status, body, _ = await edge_json(stack, "GET", f"/api/v2/pins/{pin['id']}", headers={"X-Plex-Client-Identifier": cid})
    assert status == 200 and body["authToken"]
    assert await user_status(stack, body["authToken"]) == 200
    status, _, _ = await edge_json(stack, "GET", "/api/v2/pins/999999999", headers={"X-Plex-Client-Identifier": cid})
    assert status == 404


async def oauth(stack: Stack, path: str, **data: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + path, data=data) as r:
            return r.status, await r.json()


async def test_rfc8628_flow_with_slow_down_denial_and_expiry(stack: Stack) -> None:
    a, token = await signed_in(stack)
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.edge_url + "/.well-known/oauth-authorization-server") as r:
            meta = await r.json()
    assert meta["device_authorization_endpoint"].endswith("/oauth/device/code")
    assert GRANT in meta["grant_types_supported"]
    status, auth = await oauth(stack, "/oauth/device/code", client_id="my-tv-app")
    assert status == 200 and auth["interval"] == 5 and auth["expires_in"] == 900
    user_code = auth["user_code"]
    assert len(user_code) == 9 and user_code[4] == "-" and all(c in "BCDFGHJKLMNPQRSTVWXZ" for c in user_code.replace("-", ""))
    assert auth["verification_uri"] == stack.edge_url + "/link"
    assert auth["verification_uri_complete"] == f"{stack.edge_url}/link?code={user_code}"
    poll = {"grant_type": GRANT, "device_code": auth["device_code"], "client_id": "my-tv-app"}
    assert await oauth(stack, "/oauth/token", **poll) == (400, {"error": "authorization_pending",
                                                              "error_description": "The user has not approved this code yet"})
    status, body = await oauth(stack, "/oauth/token", **poll)
    assert (status, body["error"]) == (400, "slow_down") and "10" in body["error_description"]
    status, body = await oauth(stack, "/oauth/token", **poll)
    assert body["error"] == "slow_down" and "15" in body["error_description"]
    messy = user_code.lower().replace("-", " ")
    assert (await link(stack, token, messy))[0] == 204
    status, body = await oauth(stack, "/oauth/token", **poll)
    assert status == 200 and body["token_type"] == "Bearer"
    assert await user_status(stack, body["access_token"]) == 200
    assert (await oauth(stack, "/oauth/token", **poll))[1]["error"] == "invalid_grant"
    # denial
    _, denied = await oauth(stack, "/oauth/device/code", client_id="my-tv-app")
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url("linkcode") + f"/internal/codes/{denied['user_code']}/approve",
                             json={"account_id": str(uuid.UUID(a["id"])), "deny": True},
                             headers={"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}"}) as r:
            assert r.status == 200
    assert (await oauth(stack, "/oauth/token", grant_type=GRANT, device_code=denied["device_code"],
                        client_id="my-tv-app"))[1]["error"] == "access_denied"
    # expiry
    _, expiring = await oauth(stack, "/oauth/device/code", client_id="my-tv-app")
    conn = await linkcode_db(stack)
    try:
        await conn.execute("UPDATE device_codes SET expires_at = now() - interval '1 second' WHERE status = 'pending'")
    finally:
        await conn.close()
    assert (await oauth(stack, "/oauth/token", grant_type=GRANT, device_code=expiring["device_code"],
                        client_id="my-tv-app"))[1]["error"] == "expired_token"
    assert (await oauth(stack, "/oauth/token", grant_type="password"))[1]["error"] == "unsupported_grant_type"
    assert (await oauth(stack, "/oauth/device/code"))[0] == 400


async def test_claim_exchanged_as_the_docker_first_run_script_does(stack: Stack) -> None:
    a, token = await signed_in(stack)
    status, body, _ = await edge_json(stack, "GET", "/api/claim/token.json", headers={"X-Plex-Token": token})
    assert status == 200 and body["token"].startswith("claim-")
    claim = body["token"]
    status, _, _ = await edge_json(stack, "GET", "/api/claim/token.json")
    assert status == 401
    cid = f"pms-{uuid.uuid4().hex[:8]}"
    script = (
        'token="$(curl -X POST -s -H "X-Plex-Client-Identifier: ${CID}" -H "X-Plex-Product: Plex Media Server" '
        '-H "X-Plex-Version: 1.1" -H "X-Plex-Provides: server" -H "X-Plex-Platform: Linux" '
        '-H "X-Plex-Platform-Version: 1.0" -H "X-Plex-Device-Name: PlexMediaServer" -H "X-Plex-Device: Linux" '
        '"${BASE}/api/claim/exchange?token=${PLEX_CLAIM}")"\n'
        "token=\"$(echo \"$token\" | sed -n 's/.*<authentication-token>\\(.*\\)<\\/authentication-token>.*/\\1/p')\"\n"
        'printf "%s" "$token"\n'
    )
    env = {"CID": cid, "BASE": stack.edge_url, "PLEX_CLAIM": claim, "PATH": "/usr/bin:/bin"}
    result = await asyncio.to_thread(subprocess.run, ["bash", "-c", script], env=env, capture_output=True, text=True)
    server_token = result.stdout.strip()
    assert len(server_token) >= 32, result
    assert await user_status(stack, server_token) == 200
    account = await asyncio.to_thread(MyPlexAccount, token=token, session=plex_session(stack.edge_url))
    resources = await asyncio.to_thread(account.resources)
    servers = [r for r in resources if r.clientIdentifier == cid]
    assert servers and "server" in servers[0].provides and servers[0].owned
    again = await asyncio.to_thread(subprocess.run, ["bash", "-c", script], env=env, capture_output=True, text=True)
    assert again.stdout.strip() == ""  # single use
    status, body, _ = await edge_json(stack, "POST", f"/api/claim/exchange?token={claim}",
                                      headers={"X-Plex-Client-Identifier": cid})
    assert status == 400 and body["errors"][0]["code"] == 1123


async def test_wrong_code_budget_is_exhausted_then_released(stack: Stack) -> None:
    _, token = await signed_in(stack)
    for _ in range(5):
        assert (await link(stack, token, "ZZZZ"))[0] == 404
    status, body = await link(stack, token, "ZZZZ")
    assert status == 404  # the 6th wrong entry is counted and starts the refusal
    _, pin, _ = await edge_json(stack, "POST", "/api/v2/pins", headers={"X-Plex-Client-Identifier": "budget-tv"})
    status, body = await link(stack, token, pin["code"])
    assert status == 429 and body["errors"][0]["code"] == 1120  # type: ignore[index]
    await asyncio.sleep(6.5)
    assert (await link(stack, token, pin["code"]))[0] == 204


async def test_sign_out_between_link_and_collection_never_delivers_the_token(stack: Stack) -> None:
    a, token = await signed_in(stack, client="phone")
    cid = f"tv-{uuid.uuid4().hex[:6]}"
    _, pin, _ = await edge_json(stack, "POST", "/api/v2/pins", headers={"X-Plex-Client-Identifier": cid})
    assert (await link(stack, token, pin["code"]))[0] == 204
    status, _, _ = await edge_json(stack, "PUT", "/api/v2/user/password",
                                   data={"currentPassword": PASSWORD, "password": "revoked before collection",
                                         "signOutDevices": "true"}, headers={"X-Plex-Token": token})
    assert status == 204
    for _ in range(20):
        status, body, _ = await edge_json(stack, "GET", f"/api/v2/pins/{pin['id']}",
                                          headers={"X-Plex-Client-Identifier": cid})
        assert status == 404 or body["authToken"] is None, body
        await asyncio.sleep(0.1)
    assert status == 404
