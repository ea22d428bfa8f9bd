"""Each service's real ``create_app`` in-process (aiohttp's test client), with none of its resources
started: no database, no broker, no other service. Requests that must be refused on their input alone
are refused with the route family's error shape, which also proves that validation runs before any
resource is touched (a handler that reached for its pool here would answer 500)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.crypto import new_key_spec

pytestmark = pytest.mark.unit

COMMON = {"internal_api_secret": secrets.token_urlsafe(32), "token_hmac_key": secrets.token_urlsafe(32),
          "holder_secret": secrets.token_urlsafe(32), "database_url": "postgresql://127.0.0.1:1/none",
          "kafka_bootstrap_servers": "127.0.0.1:1", "client_max_size": 4096}


def _auth() -> web.Application:
    from services.auth.app import create_app
    from services.auth.settings import Settings
    return create_app(Settings(**COMMON, seal_keys=new_key_spec("k1")))


def _devicesession() -> web.Application:
    from services.devicesession.app import create_app
    from services.devicesession.settings import Settings
    return create_app(Settings(**COMMON))


def _linkcode() -> web.Application:
    from services.linkcode.app import create_app
    from services.linkcode.settings import Settings
    return create_app(Settings(**COMMON, linkcode_seal_keys=new_key_spec("l1")))


def _notification() -> web.Application:
    from services.notification.app import create_app
    from services.notification.settings import Settings
    return create_app(Settings(**COMMON, seal_keys=new_key_spec("k1")))


def _web() -> web.Application:
    from services.web.app import create_app
    from services.web.settings import Settings
    return create_app(Settings(**COMMON, csrf_secret=secrets.token_urlsafe(32)))


async def _client(factory: Callable[[], web.Application]) -> AsyncIterator[TestClient]:
    app = factory()
    app.cleanup_ctx.clear()  # no resources: whatever needs one would fail loudly
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.fixture
async def auth() -> AsyncIterator[TestClient]:
    async for c in _client(_auth):
        yield c


@pytest.fixture
async def devicesession() -> AsyncIterator[TestClient]:
    async for c in _client(_devicesession):
        yield c


@pytest.fixture
async def linkcode() -> AsyncIterator[TestClient]:
    async for c in _client(_linkcode):
        yield c


@pytest.fixture
async def notification() -> AsyncIterator[TestClient]:
    async for c in _client(_notification):
        yield c


@pytest.fixture
async def webapp() -> AsyncIterator[TestClient]:
    async for c in _client(_web):
        yield c


async def plex_error(resp: Any) -> tuple[int, int]:
    body = await resp.json(content_type=None)
    return resp.status, body["errors"][0]["code"]


JSON = {"Accept": "application/json"}


async def test_auth_refuses_bad_input_before_touching_anything(auth: TestClient) -> None:
    r = await auth.post("/api/v2/users/signin", data={"login": "a", "password": "b"}, headers=JSON)
    assert await plex_error(r) == (400, 1000)  # no X-Plex-Client-Identifier
    r = await auth.post("/api/v2/users/signin", data={"login": "a", "password": "b", "rememberMe": "maybe"},
                        headers={**JSON, "X-Plex-Client-Identifier": "c"})
    assert (await plex_error(r))[0] == 400
    r = await auth.post("/api/v2/users", data="x" * 10_000, headers={**JSON, "Content-Type": "text/plain"})
    assert (await plex_error(r))[0] in (413, 415)
    r = await auth.post("/api/v2/users", data=b"[1,2]", headers={**JSON, "Content-Type": "application/json"})
    assert (await plex_error(r))[0] == 400
    r = await auth.get("/api/v2/nothing-here", headers=JSON)
    assert await plex_error(r) == (404, 1404)
    r = await auth.get("/api/v2/users/signin")  # XML by default, Plex's errors shape
    assert r.status == 405 and (await r.text()).startswith("<?xml") and "<errors>" in await r.text()


async def test_devicesession_internal_and_holder_routes_need_their_credentials(devicesession: TestClient) -> None:
    r = await devicesession.post("/internal/sessions/revoke", json={"token": "x"})
    assert r.status == 401 and (await r.json(content_type=None))["status"] == 401  # problem JSON
    r = await devicesession.post("/oauth/introspect", data={"token": "x"})
    body = await r.json()
    assert r.status == 401 and body["error"] and "WWW-Authenticate" in r.headers  # OAuth error JSON
    r = await devicesession.post("/oauth/introspect", data={"token": "x"},
                                 headers={"Authorization": "Basic !!!not-base64"})
    assert r.status == 401


async def test_linkcode_refuses_bad_input_before_touching_anything(linkcode: TestClient) -> None:
    r = await linkcode.post("/api/v2/pins?strong=maybe", headers={**JSON, "X-Plex-Client-Identifier": "c"})
    assert (await plex_error(r))[0] == 400
    r = await linkcode.get("/api/v2/pins/not-a-number", headers=JSON)
    assert await plex_error(r) == (404, 1020)
    r = await linkcode.put("/api/v2/pins/link", data="x" * 10_000, headers={**JSON, "Content-Type": "text/plain"})
    assert (await plex_error(r))[0] in (413, 415)


async def test_notification_internal_route_needs_the_secret(notification: TestClient) -> None:
    r = await notification.get("/internal/incidents/x/deliveries")
    assert r.status == 401


async def test_web_forms_need_csrf_and_pages_render_signed_out(webapp: TestClient) -> None:
    r = await webapp.get("/signin")
    assert r.status == 200 and 'name="csrf_token"' in await r.text()
    r = await webapp.post("/signin", data={"login": "a", "password": "b"})
    assert r.status == 403
    r = await webapp.get("/account", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/signin")
