"""Helpers of the security tests: requests to the edge from a chosen loopback address, so that a
test's per-address budgets are its own (the edge sets X-Forwarded-For to the peer address)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import aiohttp
import asyncpg

from deploy.launcher import Stack
from shared.settings import with_database

_next_host = itertools.count(20)


def fresh_address() -> str:
    """A loopback address no other test uses (127.0.1.20, 127.0.1.21, ...)."""
    n = next(_next_host)
    return f"127.0.{1 + n // 250}.{n % 250 + 1}"


def session_from(address: str, **kw: Any) -> aiohttp.ClientSession:
    kw.setdefault("cookie_jar", aiohttp.CookieJar(unsafe=True))  # cookies of 127.0.0.1 too
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)), **kw)


async def call(stack: Stack, method: str, path: str, *, source: str | None = None,
               http: aiohttp.ClientSession | None = None, json_accept: bool = True,
               **kw: Any) -> tuple[int, Any, Any]:
    """One request to the edge; returns (status, parsed JSON or the text, headers)."""
    headers = {"X-Plex-Client-Identifier": "security-tests", **kw.pop("headers", {})}
    if json_accept:
        headers.setdefault("Accept", "application/json")
    own = http is None
    http = http or (session_from(source) if source else aiohttp.ClientSession())
    try:
        async with http.request(method, stack.edge_url + path, headers=headers, allow_redirects=False, **kw) as r:
            raw = await r.read()
            text = raw.decode(errors="replace")
            body: Any = text
            if r.content_type in ("application/json", "application/problem+json") and raw:
                import orjson

                body = orjson.loads(raw)
            return r.status, body, r.headers
    finally:
        if own:
            await http.close()


def db_url(stack: Stack, service: str) -> str:
    return with_database(stack.database_url, f"{stack.extra_env['DB_NAME_PREFIX']}hearth_{service}")


async def db(stack: Stack, service: str) -> asyncpg.Connection:
    return await asyncpg.connect(db_url(stack, service))


def plex_error_codes(body: Any) -> list[int]:
    """The codes of a Plex-shaped error answer (JSON)."""
    assert isinstance(body, dict) and isinstance(body.get("errors"), list), body
    return [int(e["code"]) for e in body["errors"]]


CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
