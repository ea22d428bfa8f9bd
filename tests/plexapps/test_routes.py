"""The routes the "Sign in with Plex" apps call, requested and parsed the way those apps do it.

Tautulli parses XML (minidom/ElementTree), Ombi and Organizr post legacy sign-ins, Overseerr sends
``Accept: application/json`` and parses ``/api/resources`` as XML, browsers preflight with CORS, and
a media server publishes its connections. Everything runs against the real stack through the edge.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import aiohttp
import pytest
from plexapi.myplex import MyPlexAccount

from deploy.launcher import Stack
from tests.auth.test_auth import PASSWORD, sign_in, sign_up, user_status
from tests.conftest import edge_json
from tests.plexclient import plex_session

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]
OMBI = {"X-Plex-Client-Identifier": "ombi-0001", "X-Plex-Product": "Ombi", "X-Plex-Version": "3",
        "X-Plex-Device": "Ombi", "X-Plex-Platform": "Web", "Accept": "application/json"}


async def call(stack: Stack, method: str, path: str, **kw: Any) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, stack.edge_url + path, **kw) as r:
            return r.status, await r.read(), r.headers


async def signed_in(stack: Stack, client: str = "tests") -> tuple[dict[str, str], str]:
    a = await sign_up(stack)
    status, body, _ = await sign_in(stack, a["username"], client=client)
    assert status == 201
    return a, body["authToken"]


async def test_legacy_sign_in_as_ombi_organizr_and_basic_scripts(stack: Stack) -> None:
    a = await sign_up(stack)
    # Ombi: JSON {"user": {"login", "password"}}
    status, body, _ = await call(stack, "POST", "/users/sign_in.json", json={"user": {"login": a["username"],
                                                                                   "password": PASSWORD}},
                                 headers=OMBI)
    assert status == 201, body
    import orjson

    user = orjson.loads(body)["user"]
    assert user["authentication_token"] and user["authentication_token"] == user["authToken"]
    assert user["email"] == a["email"] and isinstance(user["id"], int)
    assert await user_status(stack, user["authentication_token"]) == 200
    # Organizr: form fields user[login] / user[password], by email
    status, body, _ = await call(stack, "POST", "/users/sign_in.json",
                                 data={"user[login]": a["email"], "user[password]": PASSWORD},
                                 headers={"X-Plex-Client-Identifier": "01010101-10101010", "X-Plex-Product": "Organizr"})
    assert status == 201 and orjson.loads(body)["user"]["authentication_token"]
    # scripts: HTTP Basic to the XML variant, parsed as Tautulli parses it (attribute and child)
    status, body, headers = await call(stack, "POST", "/users/sign_in.xml",
                                       auth=aiohttp.BasicAuth(a["username"], PASSWORD),
                                       headers={"X-Plex-Client-Identifier": "script-1", "Accept": "application/json"})
    assert status == 201 and headers["Content-Type"].startswith("application/xml")
    root = ET.fromstring(body)
    assert root.tag == "user" and root.get("authenticationToken")
    assert root.findtext("authentication-token") == root.get("authenticationToken")
    # bad credentials: 401 in every form, Plex's error shape
    for kw in ({"json": {"user": {"login": a["username"], "password": "wrong password"}}},
               {"data": {"user[login]": a["username"], "user[password]": "wrong password"}},
               {"auth": aiohttp.BasicAuth(a["username"], "wrong password")},
               {"auth": aiohttp.BasicAuth(f"nobody-{uuid.uuid4().hex[:6]}", "wrong password")}):
        status, body, _ = await call(stack, "POST", "/users/sign_in.json", headers=OMBI, **kw)
        assert status == 401 and orjson.loads(body)["errors"][0]["code"] == 1001
    status, body, _ = await call(stack, "POST", "/users/sign_in.json", data={"user[login]": a["username"],
                                                                             "user[password]": PASSWORD})
    assert status == 400 and orjson.loads(body)["errors"][0]["code"] == 1000  # no X-Plex-Client-Identifier
    status, _, _ = await call(stack, "POST", "/users/sign_in.json", data=b"{not json", headers={
        **OMBI, "Content-Type": "application/json"})
    assert status == 400


async def test_legacy_sign_in_shares_the_v2_sign_in_throttle(stack: Stack) -> None:
    a = await sign_up(stack)
    for _ in range(6):
        status, _, _ = await call(stack, "POST", "/users/sign_in.json", headers=OMBI,
                                  json={"user": {"login": a["username"], "password": "wrong password"}})
        assert status == 401
    status, body, headers = await sign_in(stack, a["username"], PASSWORD)  # /api/v2/users/signin
    assert status == 429 and body["errors"][0]["code"] == 1111 and int(headers["Retry-After"]) >= 1
    status, _, headers = await call(stack, "POST", "/users/sign_in.json", headers=OMBI,
                                    json={"user": {"login": a["username"], "password": PASSWORD}})
    assert status == 429 and int(headers["Retry-After"]) >= 1


async def test_users_account_in_every_shape_the_apps_read(stack: Stack) -> None:
    a, token = await signed_in(stack)
    import orjson

    # Overseerr / Jellyseerr / Ombi: JSON, token in the header or the query
    for kw in ({"headers": {"X-Plex-Token": token, "Accept": "application/json"}},
               {"params": {"X-Plex-Token": token}}):
        status, body, _ = await call(stack, "GET", "/users/account.json", **kw)  # type: ignore[arg-type]
        assert status == 200
        user = orjson.loads(body)["user"]
        assert user["email"] == a["email"] and user["username"] == a["username"] and isinstance(user["id"], int)
        assert user["authentication_token"] == token and user["authToken"] == token and user["uuid"]
        assert user["subscription"]["active"] is False and user["roles"] == {"roles": []}
        assert user["entitlements"] == [] and user["joined_at"] and "hasPassword" in user
    # Tautulli and go-plex-client: /users/account and .xml, XML whatever Accept says
    for path in ("/users/account", "/users/account.xml"):
        status, body, headers = await call(stack, "GET", path, headers={"X-Plex-Token": token,
                                                                        "Accept": "application/json"})
        assert status == 200 and headers["Content-Type"].startswith("application/xml"), path
        root = ET.fromstring(body)
        assert root.tag == "user" and root.get("email") == a["email"]
        assert root.findtext("authentication-token") == token
        assert root.find("subscription") is not None and root.find("subscription").get("active") == "0"  # type: ignore[union-attr]
    for path in ("/users/account", "/users/account.json"):
        status, body, _ = await call(stack, "GET", path, headers={"X-Plex-Token": "not-a-token"})
        assert status == 401
        if path.endswith(".json"):
            assert orjson.loads(body)["errors"][0]["code"] == 1001
        else:
            assert ET.fromstring(body).find("error").get("code") == "1001"  # type: ignore[union-attr]


async def test_ping_users_and_shared_servers_parse_as_tautulli_and_plexapi_parse_them(stack: Stack) -> None:
    _, token = await signed_in(stack)
    status, body, _ = await call(stack, "GET", "/api/v2/ping", headers={"X-Plex-Token": token})
    root = ET.fromstring(body)
    assert status == 200 and root.tag == "pong" and root.text == "true"  # Tautulli: <pong>; plexapi: text
    from xml.dom import minidom

    assert minidom.parseString(body).getElementsByTagName("pong")
    status, body, _ = await call(stack, "GET", "/api/v2/ping", headers={"X-Plex-Token": token,
                                                                         "Accept": "application/json"})
    assert status == 200 and body == b'{"pong":true}'
    for accept in ("application/json", "application/xml"):
        status, body, headers = await call(stack, "GET", "/api/users", headers={"X-Plex-Token": token,
                                                                                "Accept": accept})
        root = ET.fromstring(body)
        assert status == 200 and headers["Content-Type"].startswith("application/xml")
        assert root.tag == "MediaContainer" and root.get("size") == "0" and root.get("friendlyName") == "myPlex"
        assert root.get("identifier") == "com.plexapp.plugins.myplex"
        status, body, _ = await call(stack, "GET", "/api/servers/abc123/shared_servers",
                                     headers={"X-Plex-Token": token, "Accept": accept})
        root = ET.fromstring(body)
        assert status == 200 and root.tag == "MediaContainer" and root.get("size") == "0" and not list(root)
    assert (await call(stack, "GET", "/api/users", headers={"X-Plex-Token": "bad"}))[0] == 401
    assert (await call(stack, "GET", "/api/servers/abc/shared_servers"))[0] == 401
    assert (await call(stack, "GET", "/api/v2/ping"))[0] == 401


async def claimed_server(stack: Stack, owner_token: str) -> tuple[str, str]:
    status, body, _ = await edge_json(stack, "GET", "/api/claim/token.json", headers={"X-Plex-Token": owner_token})
    assert status == 200
    cid = f"pms-{uuid.uuid4().hex[:10]}"
    status, raw, _ = await call(stack, "POST", f"/api/claim/exchange?token={body['token']}", headers={
        "X-Plex-Client-Identifier": cid, "X-Plex-Product": "Plex Media Server", "X-Plex-Provides": "server",
        "X-Plex-Version": "1.41.0", "X-Plex-Platform": "Linux", "X-Plex-Device-Name": "Attic"})
    assert status == 200
    server_token = ET.fromstring(raw).findtext("authentication-token")
    assert server_token
    return cid, server_token


async def test_server_publishes_connections_and_owned_resources_carry_a_usable_token(stack: Stack) -> None:
    a, owner_token = await signed_in(stack)
    cid, server_token = await claimed_server(stack, owner_token)
    holder = stack.ports["holder:alpha"]
    local_uri, remote_uri = f"http://127.0.0.1:{holder}", "https://203.0.113.7:32400"
    # as Plex Media Server does it: PUT /devices/{machineIdentifier}?Connection[][uri]=...&X-Plex-Token=...
    status, body, _ = await call(stack, "PUT", f"/devices/{cid}", params=[
        ("Connection[][uri]", local_uri), ("Connection[][uri]", remote_uri), ("httpsRequired", "0"),
        ("X-Plex-Token", server_token)])
    assert status == 200, body
    # only the device itself publishes; bad URIs are refused clearly
    assert (await call(stack, "PUT", f"/devices/{cid}", params={"Connection[][uri]": local_uri,
                                                                 "X-Plex-Token": owner_token}))[0] == 404
    for bad in ("javascript:alert(1)", "//evil.example", "ftp://10.0.0.1/", "http://"):
        status, body, _ = await call(stack, "PUT", f"/devices/{cid}.json", params={
            "Connection[][uri]": bad, "X-Plex-Token": server_token})
        assert status == 400 and b"uri" in body.lower(), bad
    status, _, _ = await call(stack, "PUT", f"/devices/{cid}", params={"X-Plex-Token": server_token})
    assert status == 400
    # Overseerr: Accept: application/json, parses XML; Tautulli compares provides == "server"
    status, body, headers = await call(stack, "GET", "/api/resources", params={
        "includeHttps": "1", "includeRelay": "1", "X-Plex-Token": owner_token}, headers={"Accept": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("application/xml")
    root = ET.fromstring(body)
    assert root.tag == "MediaContainer" and int(root.get("size", "0")) >= 1
    device = next(d for d in root.findall("Device") if d.get("clientIdentifier") == cid)
    assert device.get("provides") == "server" and device.get("owned") == "1"
    assert device.get("accessToken") == owner_token and device.get("name") == "Attic"
    assert device.get("createdAt", "").isdigit() and device.get("lastSeenAt", "").isdigit()
    conns = {c.get("uri"): c.attrib for c in device.findall("Connection")}
    assert conns[local_uri] == {"protocol": "http", "address": "127.0.0.1", "port": str(holder), "uri": local_uri,
                                "local": "1"}
    assert conns[remote_uri]["local"] == "0" and conns[remote_uri]["port"] == "32400"
    assert conns[remote_uri]["protocol"] == "https"
    # /api/v2/resources, JSON and through python-plexapi
    status, items, _ = await edge_json(stack, "GET", "/api/v2/resources", headers={"X-Plex-Token": owner_token})
    item = next(i for i in items if i["clientIdentifier"] == cid)
    assert item["accessToken"] == owner_token and {c["uri"] for c in item["connections"]} == {local_uri, remote_uri}
    account = await asyncio.to_thread(MyPlexAccount, token=owner_token, session=plex_session(stack.edge_url))
    resource = next(r for r in await asyncio.to_thread(account.resources) if r.clientIdentifier == cid)
    assert resource.accessToken == owner_token and "server" in resource.provides
    local = next(c for c in resource.connections if c.local)
    # resource.connect(): the server (a sample holder validating with Hearth) accepts the accessToken
    async with aiohttp.ClientSession() as http:
        async with http.get(local.uri + "/library", headers={"X-Plex-Token": resource.accessToken}) as r:
            assert r.status == 200
            assert ET.fromstring(await r.read()).get("accountID") == str(uuid.UUID(a["id"]))
        async with http.get(local.uri + "/library") as r:
            assert r.status == 401
    # python-plexapi's own MyPlexResource.connect() (Home Assistant, Kometa): loopback connections only,
    # so the test never reaches out to the documentation address above
    status, _, _ = await call(stack, "PUT", f"/devices/{cid}", params=[
        ("Connection[][uri]", local_uri), ("X-Plex-Token", server_token)])
    assert status == 200
    account = await asyncio.to_thread(MyPlexAccount, token=owner_token, session=plex_session(stack.edge_url))
    resource = next(r for r in await asyncio.to_thread(account.resources) if r.clientIdentifier == cid)
    server = await asyncio.to_thread(resource.connect, timeout=10)
    assert server.machineIdentifier == "holder-alpha" and server._baseurl == local_uri
    assert server._token == owner_token
    # a second publication replaces the list
    status, _, _ = await call(stack, "PUT", f"/devices/{cid}.xml", data={"Connection[][uri]": local_uri,
                                                                          "X-Plex-Token": server_token})
    assert status == 200
    status, items, _ = await edge_json(stack, "GET", "/api/v2/resources", headers={"X-Plex-Token": owner_token})
    assert [c["uri"] for c in next(i for i in items if i["clientIdentifier"] == cid)["connections"]] == [local_uri]


async def test_cors_preflight_and_headers_on_the_plex_api_only(stack: Stack) -> None:
    _, token = await signed_in(stack)
    origin = {"Origin": "http://overseerr.example:5055"}
    asked = "accept,content-type,x-plex-product,x-plex-client-identifier,x-plex-model,x-plex-device-screen-resolution"
    for path in ("/api/v2/pins?strong=true", "/api/v2/pins/12", "/api/v2/user", "/api/v2/resources",
                 "/users/account.json", "/users/sign_in.json", "/api/resources", "/api/users", "/api/v2/ping"):
        status, body, headers = await call(stack, "OPTIONS", path, headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
        assert status == 204 and body == b"", path
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert set(headers["Access-Control-Allow-Methods"].replace(" ", "").split(",")) == {
            "GET", "POST", "PUT", "DELETE", "OPTIONS"}
        assert headers["Access-Control-Allow-Headers"] == asked
        assert "Access-Control-Allow-Credentials" not in headers
    # every answer, errors included
    answers = [
        await call(stack, "GET", "/api/v2/user", headers={**origin, "X-Plex-Token": token}),
        await call(stack, "GET", "/api/v2/user", headers={**origin, "X-Plex-Token": "bad"}),
        await call(stack, "GET", "/users/account.json", headers=origin),
        await call(stack, "GET", "/api/v2/pins/999999999", headers={**origin, "X-Plex-Client-Identifier": "x"}),
        await call(stack, "POST", "/api/v2/pins", headers=origin),  # no client identifier: 400
        await call(stack, "GET", "/api/resources", headers=origin),
        await call(stack, "GET", "/api/v2/pins/abc", headers={**origin, "X-Plex-Client-Identifier": "x"}),
    ]
    assert [s for s, _, _ in answers] == [200, 401, 401, 404, 400, 401, 404]
    for _, _, headers in answers:
        assert headers["Access-Control-Allow-Origin"] == "*" and "Access-Control-Allow-Credentials" not in headers
    # no cookie is honoured there: a web session cookie alone does not authorise the Plex API
    status, _, _ = await call(stack, "GET", "/api/v2/user", headers={**origin, "Cookie": f"hearth_session={token}"})
    assert status == 401
    # not on the account web pages
    for path in ("/signin", "/auth", "/account"):
        status, _, headers = await call(stack, "GET", path, headers=origin, allow_redirects=False)
        assert "Access-Control-Allow-Origin" not in headers, path
    status, _, headers = await call(stack, "OPTIONS", "/signin", headers={
        **origin, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize("name", ["plex.tv", "app.plex.tv", "clients.plex.tv"])
async def test_https_for_the_plex_host_names_with_the_local_ca(stack: Stack, name: str) -> None:
    _, token = await signed_in(stack)
    port = stack.https_port
    assert port and stack.tls_ca.exists()
    result = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", str(stack.tls_ca),
        "-H", f"X-Plex-Token: {token}", f"https://{name}:{port}/api/v2/ping"], capture_output=True, text=True,
        timeout=30)
    assert result.returncode == 0, result.stderr
    assert ET.fromstring(result.stdout).tag == "pong" and ET.fromstring(result.stdout).text == "true"
    # an untrusted client refuses the certificate: it is the CA that makes it work
    untrusted = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", "/etc/ssl/certs/ca-certificates.crt",
        f"https://{name}:{port}/api/v2/ping"], capture_output=True, text=True, timeout=30)
    assert untrusted.returncode != 0


async def test_legacy_sign_in_of_a_two_step_account(stack: Stack) -> None:
    """Ombi and Organizr cannot ask for a code: 401 with 1029 without one; the code in the JSON, the
    form, or appended to the password (as old apps do) signs in, once."""
    import orjson

    from tests.twofactor.test_two_factor import account_with_2fa, code

    a, secret, _, step = await account_with_2fa(stack)
    status, body, _ = await call(stack, "POST", "/users/sign_in.json", headers=OMBI,
                                 json={"user": {"login": a["username"], "password": PASSWORD}})
    assert status == 401 and orjson.loads(body)["errors"][0]["code"] == 1029
    status, body, _ = await call(stack, "POST", "/users/sign_in.json", headers=OMBI, json={
        "user": {"login": a["username"], "password": PASSWORD, "verificationCode": code(secret, step + 1)}})
    assert status == 201 and orjson.loads(body)["user"]["twoFactorEnabled"] is True
    # another account (a code's time step is used once): Organizr's form, digits appended to the password
    b, secret, _, step = await account_with_2fa(stack)
    status, body, _ = await call(stack, "POST", "/users/sign_in.json", headers=OMBI, data={
        "user[login]": b["username"], "user[password]": PASSWORD + code(secret, step + 1)})
    assert status == 201
    status, body, _ = await call(stack, "POST", "/users/sign_in.json", headers=OMBI, data={
        "user[login]": b["username"], "user[password]": PASSWORD + code(secret, step + 1)})
    assert status == 401 and orjson.loads(body)["errors"][0]["code"] == 1029  # a code works once
