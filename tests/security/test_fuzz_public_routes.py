"""Issue 16, "Done means": hypothesis fuzzes every public route, taken from the services' own route
tables, through the edge of the real stack.

Each case is one request built from: the route's method (or another), its path with hostile path
parameters, a query string (repeated keys, NUL and control characters, tokens), X-Plex-* headers
with hostile values, a body of any content type (form with any charset, multipart with any part
headers, JSON of any shape, raw bytes), oversized values, and broken Content-Encoding and
Transfer-Encoding. Asserted for every case: no 5xx; the answer is in the route's error shape; a
failing answer wrote no row in the tables the routes touch (accounts, PINs, device codes, claim
tokens, devices, sessions). After the run, a normal request on one of the reused connections still
works.

HEARTH_FUZZ_EXAMPLES (default 1500) sets the number of cases; e.g. 20000 for a long run by hand.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
import zlib
from collections.abc import Coroutine
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from deploy.launcher import Stack
from services.auth import routes as auth_routes
from services.devicesession import routes as devicesession_routes
from services.linkcode import routes as linkcode_routes
from services.web import routes as web_routes
from shared.app import error_family
from tests.auth.test_auth import PASSWORD
from tests.security.helpers import db_url, fresh_address

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1800)]
EXAMPLES = int(os.environ.get("HEARTH_FUZZ_EXAMPLES", "1500"))
COUNTS: dict[str, int] = {"cases": 0, "2xx/3xx": 0, "4xx": 0}


def public_routes() -> list[tuple[str, str]]:
    """(method, canonical path) of every route the edge serves, from each service's route table."""
    found: set[tuple[str, str]] = set()
    for module in (auth_routes, devicesession_routes, linkcode_routes, web_routes):
        app = web.Application()
        module.setup_routes(app)  # type: ignore[attr-defined]
        for route in app.router.routes():
            path = route.resource.canonical if route.resource else ""
            if route.method in ("HEAD", "*") or path.startswith("/internal") or path.startswith("/static"):
                continue
            found.add((route.method, path))
    found.add(("GET", "/static/hearth.css"))
    return sorted(found)


ROUTES = public_routes()
FIELDS = ["email", "username", "password", "login", "code", "client_id", "scope", "grant_type", "device_code",
          "token", "resetToken", "currentPassword", "signOutDevices", "rememberMe", "strong", "csrf_token", "next",
          "user[email]", "user[login]", "user[password]", "decision", "confirm", "X-Plex-Client-Identifier",
          "X-Plex-Product", "X-Plex-Device-Name", "X-Plex-Token", "X-Plex-Provides"]
PLEX_HEADERS = ["X-Plex-Client-Identifier", "X-Plex-Product", "X-Plex-Version", "X-Plex-Platform", "X-Plex-Device",
                "X-Plex-Device-Name", "X-Plex-Provides", "X-Plex-Token", "X-Plex-Model", "X-Hearth-Device-Kind"]
# Any character but surrogates (which cannot be sent as UTF-8), with NUL and controls made likely.
hostile_char = st.one_of(st.sampled_from(["\x00", "\x01", "\x1f", "\x7f", "\t", "\n", "\r", "%", "&", "=", "@", "'",
                                          '"', "<", "\u202e", "\ufeff", "é", "\U0001f600"]),
                         st.characters(blacklist_categories=("Cs",)))
text = st.text(hostile_char, max_size=40)
value = st.one_of(text, st.sampled_from(["", "1", "true", "claim-x", "ABCD", "a@b.co", PASSWORD]),
                  st.integers(300, 70_000).map(lambda n: "A" * n))  # oversized
json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                                     st.floats(allow_nan=False, allow_infinity=False), text),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=6)
pairs = st.lists(st.tuples(st.one_of(st.sampled_from(FIELDS), text), value), max_size=6)  # repeated keys allowed
# aiohttp refuses to send control characters in headers; X-Plex-* values with NUL and controls
# reach the services through the query string and the body (param() reads all three).
header_value = st.text(st.one_of(st.just("\t"), st.characters(blacklist_categories=("Cs", "Cc"))), max_size=60)
charsets = st.sampled_from([None, "utf-8", "latin-1", "bogus", "rot13", "utf-16", "base64", "ascii", "x" * 70])


def _urlencode(items: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in items)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    kind = draw(st.sampled_from(["none", "form", "multipart", "json", "raw"]))
    if kind == "none":
        return {}, b""
    if kind == "form":
        charset = draw(charsets)
        ctype = "application/x-www-form-urlencoded" + (f"; charset={charset}" if charset else "")
        return {"Content-Type": ctype}, _urlencode(draw(pairs)).encode()
    if kind == "multipart":
        boundary = draw(st.sampled_from(["XyZ", "a" * 70, ""]))
        parts = []
        for k, v in draw(pairs):
            extra = draw(st.sampled_from(["", "Content-Transfer-Encoding: bogus\r\n", "Content-Transfer-Encoding: base64\r\n",
                                          "Content-Transfer-Encoding: quoted-printable\r\n",
                                          "Content-Type: text/plain; charset=bogus\r\n",
                                          "Content-Type: text/plain; charset=utf-16\r\n",
                                          "Content-Disposition: form-data\r\n", "garbage line\r\n"]))
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n{extra}\r\n{v}\r\n'
                         .encode(errors="replace"))
        body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
        return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body
    if kind == "json":
        obj = draw(st.one_of(st.dictionaries(st.one_of(st.sampled_from(FIELDS), text), json_value, max_size=6),
                             json_value))
        return {"Content-Type": "application/json"}, orjson.dumps(obj)
    ctype = draw(st.sampled_from(["text/plain", "application/xml", "application/octet-stream", "", "*/*", "a/b; x"]))
    return ({"Content-Type": ctype} if ctype else {}), draw(st.binary(max_size=300))


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    method, path = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    segment = st.one_of(st.integers(0, 10**20).map(str), text.map(lambda t: quote(t, safe="")))
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + (draw(segment) or "x") + path[end + 1:]
    query = draw(pairs) if draw(st.booleans()) else []
    headers = {h: draw(header_value) for h in draw(st.lists(st.sampled_from(PLEX_HEADERS), max_size=4, unique=True))}
    if draw(st.booleans()):
        headers["X-Plex-Token"] = "VALID"  # replaced by the fuzz account's live token
    if draw(st.booleans()):
        headers["Accept"] = draw(st.sampled_from(["application/json", "application/xml", "*/*", "text/html"]))
    body_headers, body = draw(bodies())
    headers.update(body_headers)
    encoding = draw(st.sampled_from([None, None, None, "gzip", "deflate", "br", "identity", "gzip, gzip", "x"]))
    if encoding:
        headers["Content-Encoding"] = encoding
        if draw(st.booleans()) and encoding in ("gzip", "deflate"):
            body = zlib.compress(body)
    chunked = draw(st.integers(0, 7)) == 0
    return {"method": method, "path": path, "query": query, "headers": headers, "body": body, "chunked": chunked}


class Loop:
    """A background event loop: hypothesis drives a plain function, the requests run here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Fuzzer:
    TABLES = {"auth": ["accounts"], "linkcode": ["pins", "device_codes", "claim_tokens"],
              "devicesession": ["devices", "sessions"]}

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.sessions: list[aiohttp.ClientSession] = []
        self.dbs: dict[str, asyncpg.Connection] = {}
        self.token = ""

    async def start(self) -> None:
        for _ in range(8):  # several client addresses, so one address's throttles do not end the exploration
            self.sessions.append(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=(fresh_address(), 0), limit=1),
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False))
        for service in self.TABLES:
            self.dbs[service] = await asyncpg.connect(db_url(self.stack, service))
        self.name = f"fz{uuid.uuid4().hex[:10]}"
        await self.plain(0, "POST", "/api/v2/users", {"email": f"{self.name}@example.org", "username": self.name,
                                                     "password": PASSWORD})
        status, body = await self.plain(0, "POST", "/api/v2/users/signin",
                                        {"login": self.name, "password": PASSWORD})
        assert status == 201, body
        self.token = body["authToken"]

    async def plain(self, i: int, method: str, path: str, data: dict[str, str]) -> tuple[int, Any]:
        async with self.sessions[i].request(method, self.stack.edge_url + path, data=data, headers={
                "Accept": "application/json", "X-Plex-Client-Identifier": "fuzzer"}) as r:
            return r.status, orjson.loads(await r.read() or b"null")

    async def counts(self) -> dict[str, int]:
        out = {}
        for service, tables in self.TABLES.items():
            for t in tables:
                extra = " WHERE used_at IS NOT NULL" if t == "claim_tokens" else ""
                out[t] = await self.dbs[service].fetchval(f"SELECT count(*) FROM {t}{extra}")  # noqa: S608
        return out

    async def one(self, case: dict[str, Any], n: int) -> None:
        headers = dict(case["headers"])
        if headers.get("X-Plex-Token") == "VALID":
            headers["X-Plex-Token"] = self.token
        before = await self.counts()
        url = URL(self.stack.edge_url + case["path"] + ("?" + _urlencode(case["query"]) if case["query"] else ""),
                  encoded=True)
        body: Any = case["body"]
        if case["chunked"]:
            async def gen() -> Any:
                yield case["body"]
            body = gen()
        http = self.sessions[n % len(self.sessions)]
        async with http.request(case["method"], url, data=body if case["body"] or case["chunked"] else None,
                                headers=headers, allow_redirects=False) as r:
            raw = await r.read()
            status, ctype = r.status, r.content_type
        where = f"{case['method']} {case['path']} -> {status}: {raw[:300]!r} (case {str(case)[:1500]})"
        assert status < 500, where
        COUNTS["cases"] += 1
        if status >= 400:
            COUNTS["4xx"] += 1
            family = error_family(_FakeRequest(case["path"]))  # type: ignore[arg-type]
            if family == "plex":
                if ctype == "application/json":
                    assert isinstance(orjson.loads(raw).get("errors"), list), where
                else:
                    assert ctype == "application/xml" and raw.count(b"<error ") == 1, where
            elif family == "oauth":
                assert ctype == "application/json" and "error" in orjson.loads(raw), where
            else:
                assert ctype in ("text/html", "application/problem+json"), where
            after = await self.counts()
            assert after == before, f"a failing request wrote rows: {before} -> {after}; {where}"
        else:
            COUNTS["2xx/3xx"] += 1

    async def close(self) -> None:
        for s in self.sessions:
            await s.close()
        for c in self.dbs.values():
            await c.close()


class _FakeRequest:
    def __init__(self, path: str) -> None:
        self.path = path.split("?")[0]


@pytest.fixture(scope="module")
def fuzzer(stack: Stack) -> Any:
    loop = Loop()
    f = Fuzzer(stack)
    loop.run(f.start())
    yield loop, f
    loop.run(f.close())
    loop.close()


def test_route_list_covers_every_service() -> None:
    paths = {p for _, p in ROUTES}
    assert {"/api/v2/users", "/api/v2/pins", "/oauth/token", "/devices.xml", "/api/claim/exchange", "/signin",
            "/account"} <= paths


@settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("HEARTH_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_every_public_route_answers_crafted_requests_with_4xx_in_its_shape(fuzzer: Any, case: dict[str, Any]) -> None:
    loop, f = fuzzer
    loop.run(f.one(case, COUNTS["cases"]))


def test_after_the_fuzzing_a_reused_connection_still_works(fuzzer: Any) -> None:
    loop, f = fuzzer
    print(f"\nfuzz: {COUNTS}")
    for i in range(len(f.sessions)):
        status, body = loop.run(f.plain(i, "POST", "/api/v2/users/signin", {"login": f.name, "password": PASSWORD}))
        assert status in (201, 429), body  # 429 if the fuzzing used up this address's sign-in budget
    status, body = loop.run(f.plain(0, "POST", "/api/v2/pins", {}))
    assert status == 201, body
