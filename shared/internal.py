"""Service-to-service calls and their authentication.

Internal routes (``/internal/...``) are never routed by the edge, and each one requires
``Authorization: Bearer <INTERNAL_API_SECRET>``, compared in constant time. :class:`InternalClient`
is the caller's side: pooled keep-alive connections per service, JSON in and out, domain errors
re-raised from the callee's problem JSON so they propagate with their status and code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson
from aiohttp import web
from multidict import CIMultiDict

from shared import logs
from shared.errors import HearthError, Unauthorized, Unavailable
from shared.tokens import same


def require_internal(request: web.Request, secret: str) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not same(value.strip(), secret):
        raise Unauthorized("internal route: missing or wrong credentials")


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; httptools (llhttp) parses the answers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.body: list[bytes] = []
        self.status = 0
        self.keep_alive = False
        self.closed = False
        self.idle_since = 0.0
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed before the answer was complete"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def exchange(self, request: bytes) -> None:
        self.headers, self.body, self.status = CIMultiDict(), [], 0
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        await self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class InternalClient:
    """JSON over keep-alive HTTP/1.1 to one service.

    Internal calls sit on hot paths (every sign-in mints its session through one), so this is a
    deliberately small client: pooled connections, requests written as one buffer, answers parsed by
    httptools: a general-purpose client (aiohttp's) spends measurably more CPU per call when the
    process wakes for it alone (see the README's benchmark section). Idle connections are dropped
    after 30 s, well before the server's keep-alive timeout (75 s), so a pooled connection is not
    closed under a request.
    """

    IDLE_LIMIT = 30.0

    def __init__(self, base_url: str, secret: str, *, timeout: float = 10.0, max_connections: int = 100) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"internal URL must be http(s)://host[:port]: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self._head = (f"Host: {parts.netloc}\r\nAuthorization: Bearer {secret}\r\n"
                      "Accept: application/json\r\n").encode("latin-1")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def _connect(self) -> _Connection:
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if conn.loop is not loop:  # left over from an event loop that has ended
                continue
            if not conn.closed and now - conn.idle_since < self.IDLE_LIMIT:
                return conn
            conn.close()
        ssl = None
        if self.tls:
            import ssl as ssl_module

            ssl = ssl_module.create_default_context()
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port, ssl=ssl)
        return conn

    def _encode(self, method: str, path: str, body: Any, headers: dict[str, str] | None) -> bytes:
        target = self.prefix + path
        if not target.startswith("/") or any(c in target for c in " \r\n"):
            raise ValueError(f"bad internal path {path!r}")
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._head]
        rid = logs.request_id.get()
        if rid:
            lines.append(f"X-Request-Id: {rid}\r\n".encode("latin-1"))
        parent = logs.traceparent()
        if parent:
            lines.append(f"traceparent: {parent}\r\n".encode("latin-1"))
        for name, value in (headers or {}).items():
            if any(c in name + value for c in "\r\n") or ":" in name:
                raise ValueError(f"bad header {name!r}")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        # A JSON document already encoded (bytes, such as an event envelope) goes as it is.
        payload = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
        if body is not None:
            lines.append(b"Content-Type: application/json\r\n")
        lines.append(b"Content-Length: %d\r\n\r\n" % len(payload))
        lines.append(payload)
        return b"".join(lines)

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
                      ) -> tuple[Any, Mapping[str, str]]:
        """Call a route; returns (decoded JSON or None, response headers). Errors in problem JSON or
        Plex's ``errors`` shape are raised as HearthError with their status, code and retry-after."""
        request = self._encode(method, path, body, headers)
        async with self._slots:
            conn: _Connection | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    conn = await self._connect()
                    await conn.exchange(request)
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                if conn is not None:
                    conn.close()
                raise Unavailable(f"{self.base_url} unreachable: {type(exc).__name__}") from exc
            except BaseException:
                if conn is not None:
                    conn.close()  # cancelled mid-exchange: the connection's state is unknown
                raise
            status, answer, raw = conn.status, conn.headers, b"".join(conn.body)
            if conn.keep_alive and not conn.closed:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
        try:
            data: Any = orjson.loads(raw) if raw and answer.get("Content-Type", "").split(";")[0].endswith("json") \
                else None
        except orjson.JSONDecodeError as exc:
            raise Unavailable(f"{self.base_url} answered malformed JSON") from exc
        if status >= 400:
            raise _error(status, data, answer.get("Retry-After"))
        return data, answer

    async def call(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None) -> Any:
        """Call an internal route; returns the decoded JSON (or None for 204)."""
        data, _ = await self.request(method, path, body, headers=headers)
        return data


def _error(status: int, data: Any, retry_after: str | None) -> HearthError:
    """The callee's error as a HearthError that keeps its status, code, Plex code, field and
    Retry-After, so the caller can show each message next to its field."""
    detail = code = field = None
    plex_code: int | None = None
    if isinstance(data, dict) and isinstance(data.get("errors"), list) and data["errors"] \
            and isinstance(data["errors"][0], dict):
        first = data["errors"][0]
        detail, code, field = first.get("message"), str(first.get("code")), first.get("field")
        plex_code = first["code"] if isinstance(first.get("code"), int) else None
    elif isinstance(data, dict):
        detail, code = data.get("detail") or data.get("error_description"), data.get("code") or data.get("error")
        field = data.get("field")
    wait = int(retry_after) if retry_after and retry_after.isdigit() else None
    return HearthError(detail or f"call failed ({status})", status=status if status < 500 else 503,
                       code=str(code) if code else "internal_call_failed", retry_after=wait,
                       field=str(field) if isinstance(field, str) and field else None, plex_code=plex_code)
