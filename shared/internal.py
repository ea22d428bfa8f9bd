"""Service-to-service calls and their authentication.

Internal routes (``/internal/...``) are never routed by the edge, and each one requires
``Authorization: Bearer <INTERNAL_API_SECRET>``, compared in constant time. :class:`InternalClient`
is the caller's side: one pooled aiohttp session per service, JSON in and out, domain errors
re-raised from the callee's problem JSON so they propagate with their status and code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from shared.errors import HearthError, Unauthorized, Unavailable
from shared.tokens import same


def require_internal(request: web.Request, secret: str) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not same(value.strip(), secret):
        raise Unauthorized("internal route: missing or wrong credentials")


class InternalClient:
    def __init__(self, base_url: str, secret: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30),
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
                      ) -> tuple[Any, Mapping[str, str]]:
        """Call a route; returns (decoded JSON or None, response headers). Errors in problem JSON or
        Plex's ``errors`` shape are raised as HearthError with their status, code and retry-after."""
        hdrs = {"Authorization": f"Bearer {self.secret}", "Accept": "application/json"}
        if headers:
            hdrs.update(headers)
        try:
            async with self.session.request(method, self.base_url + path, json=body, headers=hdrs) as resp:
                raw = await resp.read()
                data: Any = orjson.loads(raw) if raw and resp.content_type.endswith("json") else None
                if resp.status >= 400:
                    raise _error(resp.status, data, resp.headers.get("Retry-After"))
                return data, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{self.base_url} unreachable: {type(exc).__name__}") from exc

    async def call(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None) -> Any:
        """Call an internal route; returns the decoded JSON (or None for 204)."""
        data, _ = await self.request(method, path, body, headers=headers)
        return data


def _error(status: int, data: Any, retry_after: str | None) -> HearthError:
    detail = code = None
    if isinstance(data, dict) and isinstance(data.get("errors"), list) and data["errors"]:
        first = data["errors"][0]
        detail, code = first.get("message"), str(first.get("code"))
    elif isinstance(data, dict):
        detail, code = data.get("detail") or data.get("error_description"), data.get("code") or data.get("error")
    wait = int(retry_after) if retry_after and retry_after.isdigit() else None
    return HearthError(detail or f"call failed ({status})", status=status if status < 500 else 503,
                       code=code or "internal_call_failed", retry_after=wait)
