"""Pieces of the browser sign-in support that need no stack: the forwardUrl check, the CORS
middleware on a real aiohttp app (errors rendered by the shared error middleware included), the
Plex-style connection parser and the by-path XML/JSON rule."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict

from services.devicesession.resources import parse_connections
from services.web.authapp import forward_host
from shared import cors, plex
from shared.app import base_app
from shared.errors import HearthError, Unauthorized
from shared.settings import CommonSettings
from tests.shared.test_app_and_plex import SECRETS


@pytest.mark.parametrize("url, host", [
    ("http://127.0.0.1:5055/login/plex/loading", "127.0.0.1:5055"),
    ("https://my.home-assistant.io/redirect/oauth?flow=1&x=%2F", "my.home-assistant.io"),
    ("HTTPS://Example.org/", "example.org"),
    ("javascript:alert(1)", None), ("//evil.example/x", None), ("/relative", None), ("data:text/html,x", None),
    ("http:/evil", None), ("http://", None), ("https://evil.example\\@good", None), ("http://a b/", None),
    ("http://example.org/\r\nSet-Cookie: x=1", None), ("http://[::1/", None), ("ftp://example.org/", None),
    ("http://example.org:99999/", None), ("https://ex\u00e4mple.org/", None), ("https://x/" + "a" * 3000, None),
])
def test_forward_url_must_be_an_absolute_http_url_sendable_unchanged(url: str, host: str | None) -> None:
    assert forward_host(url) == host


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    app = base_app(CommonSettings(service_name="t", **SECRETS))  # type: ignore[arg-type]
    cors.install(app)

    async def user(request: web.Request) -> web.Response:
        if "Cookie" in request.headers:
            return web.Response(text="a cookie reached the handler")
        raise Unauthorized()

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("internals")

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Cookie", "none"))

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/elsewhere")

    app.router.add_get("/api/v2/user", user)
    app.router.add_get("/api/v2/boom", boom)
    app.router.add_get("/users/moved", moved)
    app.router.add_get("/account", page)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_cors_on_plex_routes_errors_included_and_never_with_credentials(client: TestClient) -> None:  # type: ignore[type-arg]
    r = await client.options("/api/v2/pins", headers={"Origin": "http://app.example", "Access-Control-Request-Method":
                                                      "POST", "Access-Control-Request-Headers": "X-Plex-Product, Accept"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Allow-Headers"] == "X-Plex-Product, Accept"
    assert "DELETE" in r.headers["Access-Control-Allow-Methods"]
    # a hostile header list is not reflected
    r = await client.options("/api/v2/pins", headers={"Access-Control-Request-Method": "GET",
                                                      "Access-Control-Request-Headers": "x\u00ff<script>"})
    assert r.status == 204 and "X-Plex-Client-Identifier" in r.headers["Access-Control-Allow-Headers"]
    for path, status in (("/api/v2/user", 401), ("/api/v2/boom", 500), ("/api/v2/missing", 404)):
        r = await client.get(path, headers={"Origin": "http://app.example", "Cookie": "hearth_session=abc"})
        assert r.status == status and r.headers["Access-Control-Allow-Origin"] == "*", path
        assert "Access-Control-Allow-Credentials" not in r.headers
    r = await client.get("/users/moved", allow_redirects=False)
    assert r.status == 303 and r.headers["Access-Control-Allow-Origin"] == "*"
    # not on pages, where the cookie is honoured
    r = await client.get("/account", headers={"Origin": "http://app.example", "Cookie": "hearth_session=abc"})
    assert "Access-Control-Allow-Origin" not in r.headers and await r.text() == "hearth_session=abc"
    r = await client.options("/account", headers={"Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_connections_in_plex_media_servers_shape() -> None:
    values = MultiDict([("Connection[][uri]", "http://192.168.1.10:32400"), ("Connection[][uri]", "https://x.example"),
                        ("Connection[][uri]", "http://[fe80::1]:32400")])
    assert parse_connections(values) == [
        {"protocol": "http", "address": "192.168.1.10", "port": 32400, "uri": "http://192.168.1.10:32400",
         "local": True},
        {"protocol": "https", "address": "x.example", "port": 443, "uri": "https://x.example", "local": False},
        {"protocol": "http", "address": "fe80::1", "port": 32400, "uri": "http://[fe80::1]:32400", "local": True},
    ]
    explicit = MultiDict([("Connection[][uri]", "http://10.0.0.2:1"), ("Connection[][protocol]", "http"),
                          ("Connection[][address]", "10.0.0.2"), ("Connection[][port]", "32400"),
                          ("Connection[][local]", "0")])
    assert parse_connections(explicit)[0] == {"protocol": "http", "address": "10.0.0.2", "port": 32400,
                                              "uri": "http://10.0.0.2:1", "local": False}
    for bad in (MultiDict(), MultiDict([("Connection[][uri]", "javascript:x")]),
                MultiDict([("Connection[][uri]", "http://a:1"), ("Connection[][port]", "x")]),
                MultiDict([("Connection[][uri]", f"http://h{i}:1") for i in range(21)])):
        with pytest.raises(HearthError) as info:
            parse_connections(bad)
        assert info.value.status == 400


@pytest.mark.parametrize("path, accept, json", [
    ("/api/v2/user", "application/json", True), ("/api/v2/user", "", False), ("/api/v2/user.xml", "application/json",
                                                                              False),
    ("/users/account", "application/json", False), ("/users/account.json", "", True),
    ("/api/resources", "application/json", False), ("/api/users", "application/json", False),
    ("/api/claim/token", "application/json", True), ("/devices", "application/json", False),
])
def test_outside_api_v2_the_path_decides(path: str, accept: str, json: bool) -> None:
    from aiohttp.test_utils import make_mocked_request

    assert plex.wants_json(make_mocked_request("GET", path, headers={"Accept": accept})) is json
