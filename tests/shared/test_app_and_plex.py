"""The app factory (errors, request ids, limits, health, metrics) and the Plex renderer."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared import db, plex
from shared.app import base_app
from shared.errors import NotFound, Throttled
from shared.settings import CommonSettings

SECRETS = {"internal_api_secret": "x" * 32, "token_hmac_key": "a" * 43, "holder_secret": "h" * 32}


async def echo_client(request: web.Request) -> web.Response:
    info = await plex.client_info(request)
    return plex.respond(request, xml=plex.element("client", info.as_dict()), json=info.as_dict())


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals")


async def throttled(request: web.Request) -> web.Response:
    raise Throttled("slow down", retry_after=7)


async def missing(request: web.Request) -> web.Response:
    raise NotFound("Code not found or expired", plex_code=1020)


async def echo_body(request: web.Request) -> web.Response:
    return web.json_response({"n": len(await request.read())})


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = base_app(CommonSettings(**SECRETS, service_name="unit", client_max_size=1024))
    app.router.add_route("*", "/api/v2/echo", echo_client)
    app.router.add_route("*", "/api/v2/echo.json", echo_client)
    app.router.add_get("/api/v2/boom", boom)
    app.router.add_get("/other/boom", boom)
    app.router.add_get("/oauth/slow", throttled)
    app.router.add_get("/api/v2/pins/1", missing)
    app.router.add_post("/other/body", echo_body)
    c = TestClient(TestServer(app))
    await c.start_server()
    yield c
    await c.close()


async def test_plex_routes_answer_xml_by_default_and_json_when_asked(client: TestClient) -> None:
    r = await client.get("/api/v2/echo", headers={"X-Plex-Product": "Plex Web"})
    assert r.content_type == "application/xml"
    assert ET.fromstring(await r.read()).attrib["product"] == "Plex Web"
    r = await client.get("/api/v2/echo", headers={"Accept": "application/json", "X-Plex-Product": "P"})
    assert r.content_type == "application/json" and (await r.json())["product"] == "P"
    r = await client.get("/api/v2/echo.json?X-Plex-Product=Q")
    assert (await r.json())["product"] == "Q"


async def test_plex_headers_come_from_headers_then_query_then_form(client: TestClient) -> None:
    r = await client.post("/api/v2/echo.json?X-Plex-Device=query", data={"X-Plex-Device": "form",
                                                                          "X-Plex-Client-Identifier": "cid"},
                          headers={"X-Plex-Product": "hdr"})
    body = await r.json()
    assert (body["product"], body["device"], body["client_identifier"]) == ("hdr", "query", "cid")


async def test_unexpected_errors_are_a_plain_500_without_internals(client: TestClient) -> None:
    r = await client.get("/api/v2/boom")
    assert r.status == 500
    text = await r.text()
    assert "secret internals" not in text and 'code="1500"' in text
    r = await client.get("/other/boom")
    assert r.status == 500 and (await r.json())["code"] == "internal_error"


async def test_error_shapes_per_route_family(client: TestClient) -> None:
    r = await client.get("/api/v2/pins/1", headers={"Accept": "application/json"})
    assert r.status == 404
    assert await r.json() == {"errors": [{"code": 1020, "message": "Code not found or expired", "status": 404}]}
    r = await client.get("/oauth/slow")
    assert r.status == 429 and r.headers["Retry-After"] == "7"
    assert (await r.json())["error"] == "too_many_requests"
    r = await client.get("/nowhere")
    assert r.status == 404 and r.content_type == "application/problem+json"


async def test_oversized_and_malformed_bodies_get_4xx(client: TestClient) -> None:
    r = await client.post("/other/body", data=b"x" * 5000)
    assert r.status == 413
    r = await client.post("/api/v2/echo", data=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = await client.post("/api/v2/echo", data={"X-Plex-Product": "p" * 700})
    assert r.status == 400


async def test_request_ids_are_kept_or_made(client: TestClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    r = await client.get("/healthz", headers={"X-Request-Id": "<script>"})
    assert r.headers["X-Request-Id"] != "<script>" and len(r.headers["X-Request-Id"]) == 32


async def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    r = await client.get("/readyz")
    assert r.status == 200 and (await r.json())["ready"] is True
    await client.get("/api/v2/echo")
    text = await (await client.get("/metrics")).text()
    assert 'hearth_http_request_seconds_count{method="GET",route="/api/v2/echo",service="unit",status="200"}' in text


def test_booleans_parse_case_insensitively() -> None:
    assert plex.parse_bool("True") and plex.parse_bool("1") and not plex.parse_bool("false")
    with pytest.raises(Exception):
        plex.parse_bool("maybe")


async def test_migrations_apply_once_even_when_started_concurrently(scratch_db: str, tmp_path: Path) -> None:
    mig = tmp_path / "m"
    mig.mkdir()
    (mig / "0001_create_widgets.sql").write_text("CREATE TABLE widgets (id int PRIMARY KEY);")
    (mig / "0002_add_name.sql").write_text("ALTER TABLE widgets ADD COLUMN name text;")
    pools = [await db.create_pool(scratch_db, max_size=2) for _ in range(3)]
    try:
        results = await asyncio.gather(*(db.migrate(p, [("svc", mig)]) for p in pools))
        applied = sorted(v for r in results for v in r)
        assert applied == ["svc/0001_create_widgets", "svc/0002_add_name"]
        assert await db.migrate(pools[0], [("svc", mig)]) == []
    finally:
        for p in pools:
            await p.close()
    conn = await asyncpg.connect(scratch_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version LIKE 'svc/%'") == 2
    finally:
        await conn.close()
