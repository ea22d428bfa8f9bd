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
    return create_app(Settings(**COMMON, seal_keys=new_key_spec("k1"), two_factor_seal_keys=new_key_spec("t1")))


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


FACTORIES: dict[str, Callable[[], web.Application]] = {
    "auth": _auth, "devicesession": _devicesession, "linkcode": _linkcode, "notification": _notification,
    "web": _web,
}


@pytest.fixture
async def service(request: pytest.FixtureRequest) -> AsyncIterator[TestClient]:
    """The service named by the test's ``app`` mark, with no resources: whatever needs one fails loudly."""
    app = FACTORIES[request.node.get_closest_marker("app").args[0]]()
    app.cleanup_ctx.clear()
    async with TestClient(TestServer(app)) as client:
        yield client


async def plex_error(resp: Any) -> tuple[int, int]:
    body = await resp.json(content_type=None)
    return resp.status, body["errors"][0]["code"]


JSON = {"Accept": "application/json"}


@pytest.mark.app("auth")
async def test_auth_refuses_bad_input_before_touching_anything(service: TestClient) -> None:
    r = await service.post("/api/v2/users/signin", data={"login": "a", "password": "b"}, headers=JSON)
    assert await plex_error(r) == (400, 1000)  # no X-Plex-Client-Identifier
    r = await service.post("/api/v2/users/signin", data={"login": "a", "password": "b", "rememberMe": "maybe"},
                        headers={**JSON, "X-Plex-Client-Identifier": "c"})
    assert (await plex_error(r))[0] == 400
    r = await service.post("/api/v2/users", data="x" * 10_000, headers={**JSON, "Content-Type": "text/plain"})
    assert (await plex_error(r))[0] in (413, 415)
    r = await service.post("/api/v2/users", data=b"[1,2]", headers={**JSON, "Content-Type": "application/json"})
    assert (await plex_error(r))[0] == 400
    r = await service.get("/api/v2/nothing-here", headers=JSON)
    assert await plex_error(r) == (404, 1404)
    r = await service.get("/api/v2/users/signin")  # XML by default, Plex's errors shape
    assert r.status == 405 and (await r.text()).startswith("<?xml") and "<errors>" in await r.text()


@pytest.mark.app("devicesession")
async def test_devicesession_internal_and_holder_routes_need_their_credentials(service: TestClient) -> None:
    r = await service.post("/internal/sessions/revoke", json={"token": "x"})
    assert r.status == 401 and (await r.json(content_type=None))["status"] == 401  # problem JSON
    r = await service.post("/oauth/introspect", data={"token": "x"})
    body = await r.json()
    assert r.status == 401 and body["error"] and "WWW-Authenticate" in r.headers  # OAuth error JSON
    r = await service.post("/oauth/introspect", data={"token": "x"},
                                 headers={"Authorization": "Basic !!!not-base64"})
    assert r.status == 401


@pytest.mark.app("auth")
async def test_auth_internal_routes_need_the_secret_and_an_account_id(service: TestClient) -> None:
    """Every /internal route with an ``{account_id}``: 401 without the secret; with it, a path that is
    not a UUID is "no such account" (404), decided before the pool is reached."""
    secret = {"Authorization": f"Bearer {COMMON['internal_api_secret']}"}
    routes = [("GET", "/internal/accounts/{}"), ("POST", "/internal/accounts/{}/reset-required"),
              ("GET", "/internal/accounts/{}/two-factor"), ("POST", "/internal/accounts/{}/passkeys/options"),
              ("POST", "/internal/accounts/{}/passkeys"), ("GET", "/internal/accounts/{}/passkeys"),
              ("DELETE", "/internal/accounts/{}/passkeys/1")]
    for method, path in routes:
        r = await service.request(method, path.format("0b4e7a0e-5b8a-4c1e-9d59-0c9f8b8a1a11"), json={})
        assert r.status == 401, (method, path)
        r = await service.request(method, path.format("not-a-uuid"), json={}, headers=secret)
        assert r.status == 404, (method, path, await r.text())
    r = await service.get("/internal/accounts", headers=secret)  # no login
    assert r.status == 400


@pytest.mark.app("devicesession")
async def test_devicesession_refuses_a_handed_over_event_that_is_not_a_password_change(service: TestClient) -> None:
    """POST /internal/revocations/by-event takes only a whole ``password.changed`` envelope, checked
    before anything is written."""
    import uuid

    from shared.events import AccountCreated, PasswordChanged, envelope

    path = "/internal/revocations/by-event"
    secret = {"Authorization": f"Bearer {COMMON['internal_api_secret']}"}
    change = envelope(PasswordChanged(account_id=str(uuid.uuid4()), email="a@example.org", username="a",
                                      cause="change", revoke_sessions=True, keep_session_id=None,
                                      changed_at="2026-12-02T00:00:00+00:00"), producer="auth", key="k")
    assert (await service.post(path, data=change.encode())).status == 401
    created = envelope(AccountCreated(account_id=str(uuid.uuid4()), email="a@example.org", username="a"),
                       producer="auth", key="k")
    wrong_account = change.encode().replace(change.data["account_id"].encode(), b"nope")
    for body in (b"", b"[]", b"{\"id\": 1}", created.encode(), wrong_account):
        r = await service.post(path, data=body, headers={**secret, "Content-Type": "application/json"})
        assert r.status == 400, (body[:60], await r.text())


@pytest.mark.app("linkcode")
async def test_linkcode_refuses_bad_input_before_touching_anything(service: TestClient) -> None:
    r = await service.post("/api/v2/pins?strong=maybe", headers={**JSON, "X-Plex-Client-Identifier": "c"})
    assert (await plex_error(r))[0] == 400
    r = await service.get("/api/v2/pins/not-a-number", headers=JSON)
    assert await plex_error(r) == (404, 1020)
    r = await service.put("/api/v2/pins/link", data="x" * 10_000, headers={**JSON, "Content-Type": "text/plain"})
    assert (await plex_error(r))[0] in (413, 415)


@pytest.mark.app("notification")
async def test_notification_internal_route_needs_the_secret(service: TestClient) -> None:
    r = await service.get("/internal/incidents/x/deliveries")
    assert r.status == 401


@pytest.mark.app("web")
async def test_web_forms_need_csrf_and_pages_render_signed_out(service: TestClient) -> None:
    r = await service.get("/signin")
    assert r.status == 200 and 'name="csrf_token"' in await r.text()
    r = await service.post("/signin", data={"login": "a", "password": "b"})
    assert r.status == 403
    r = await service.get("/account", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/signin")


@pytest.mark.parametrize("path", ["/api/v2/user", "/api/v2/pins/1.json", "/devices.xml", "/pins/x", "/users/account",
                                  "/users/sign_in.json", "/oauth/token", "/signin", "/account", "/auth",
                                  "/link?code=x.json", "/api/resources?includeHttps=1"])
def test_the_edge_and_the_services_agree_on_each_paths_error_family(path: str) -> None:
    """nginx's own refusals (400, 411, 413, 414) answer in the shape the services would use."""
    import re

    from aiohttp.test_utils import make_mocked_request

    from shared.app import error_family
    from tests.conftest import ROOT

    template = (ROOT / "deploy" / "nginx" / "hearth.conf.template").read_text()
    block = template[template.index("map $request $hearth_family {"):]
    block = block[:block.index("}")]
    rules = re.findall(r'"~(.*?)" (\w+);', block)
    line = f"GET {path} HTTP/1.1"
    edge = next((family for rx, family in rules if re.search(rx, line)), "web")
    service = error_family(make_mocked_request("GET", path))
    assert edge == {"problem": "web"}.get(service, service), (path, edge, service)


@pytest.mark.app("devicesession")
async def test_unusual_methods_share_one_metric_series(service: TestClient) -> None:
    """Methods the HTTP parser knows but Hearth does not serve (WebDAV's, PURGE, ...) share the
    ``other`` series of ``hearth_http_request_seconds`` instead of adding one each."""
    from prometheus_client import REGISTRY

    def methods() -> set[str]:
        return {s.labels["method"] for m in REGISTRY.collect() if m.name == "hearth_http_request_seconds"
                for s in m.samples if s.name.endswith("_count")}

    unusual = ["PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PURGE", "REPORT", "SEARCH", "LINK"]
    for method in unusual:
        r = await service.request(method, "/oauth/introspect")
        assert r.status == 405, (method, r.status)
    r = await service.get("/healthz")
    seen = methods()
    assert "other" in seen and "GET" in seen
    assert not seen & set(unusual), seen
