"""The aiohttp application factory every service uses.

``base_app`` gives each service the same skeleton: request ids, JSON access logs, one error
middleware, a client body size limit, ``/healthz`` (alive), ``/readyz`` (database, broker and
consumers ready), Prometheus ``/metrics``. Resources are ``web.AppKey`` constants managed by
``cleanup_ctx`` generators in the order settings -> pool -> producer -> outbox relay -> consumers;
aiohttp runs cleanup in reverse, so consumers stop and commit before the producer and pool close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import asyncpg
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest

from shared import db, kafka, logs, plex
from shared.consumer import ConsumerRunner
from shared.errors import HearthError, NotFound, PayloadTooLarge, ValidationFailed
from shared.events import ALL_TOPICS
from shared.internal import require_internal
from shared.outbox import OutboxRelay
from shared.settings import CommonSettings

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", CommonSettings)
POOL = web.AppKey("pool", asyncpg.Pool)
PRODUCER = web.AppKey("producer", AIOKafkaProducer)
RELAY = web.AppKey("relay", OutboxRelay)
CONSUMERS = web.AppKey("consumers", list)
READY_CHECKS = web.AppKey("ready_checks", list)
HTML_ERRORS = web.AppKey("html_errors", object)
SERVICE_NAME = web.AppKey("service_name", str)  # for apps without CommonSettings (sample holders)


def service_name(app: web.Application) -> str:
    if SETTINGS in app:
        return app[SETTINGS].service_name
    return app.get(SERVICE_NAME, "hearth")

HTTP_SECONDS = Histogram(
    "hearth_http_request_seconds",
    "HTTP request latency",
    ["service", "route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

S = TypeVar("S", bound=CommonSettings)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ReadyCheck = Callable[[], Awaitable[bool]]


def error_family(request: web.Request) -> str:
    path = request.path
    if path.startswith("/oauth/"):
        return "oauth"
    if path.startswith(("/api/", "/devices", "/pins", "/users/")) or path.endswith((".xml", ".json")):
        return "plex"
    return "problem"


def render_error(request: web.Request, err: HearthError) -> web.StreamResponse:
    family = error_family(request)
    if family == "plex":
        return plex.error_response(request, err)
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else {}
    if family == "oauth":
        body: dict[str, Any] = {"error": err.code, "error_description": err.detail}
        if err.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="hearth"'
        return web.Response(
            body=orjson.dumps(body), status=err.status, content_type="application/json", headers=headers
        )
    problem: dict[str, Any] = {
        "type": f"https://hearth.invalid/errors/{err.code}",
        "title": err.title,
        "status": err.status,
        "detail": err.detail,
        "code": err.code,
    }
    if err.field:
        problem["field"] = err.field
    if err.retry_after is not None:
        problem["retry_after"] = err.retry_after
    problem.update(err.extra)
    return web.Response(
        body=orjson.dumps(problem), status=err.status, content_type="application/problem+json", headers=headers
    )


def _from_http_exception(exc: web.HTTPException) -> HearthError:
    if exc.status == 413:
        return PayloadTooLarge()
    if exc.status == 404:
        return NotFound("no such resource", plex_code=1404)
    if exc.status == 405:
        return HearthError("method not allowed", status=405, code="method_not_allowed", plex_code=1405)
    return HearthError(exc.reason, status=exc.status, code="http_error", plex_code=1000 + exc.status)


# Methods that get a label of their own; any other that the HTTP parser knows (WebDAV's, PURGE, ...)
# is "other", so a client sending them cannot multiply the metric's series by thirty.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_http_children: dict[tuple[str, str, str, int], Any] = {}


def _http_seconds(service: str, route: str, method: str, status: int) -> Any:
    """HTTP_SECONDS' series for one request, bound once per (service, route, method, status): every
    part is from a bounded set (routes are the app's own patterns or "unmatched")."""
    key = (service, route, method if method in _METHODS else "other", status)
    child = _http_children.get(key)
    if child is None:
        child = _http_children[key] = HTTP_SECONDS.labels(key[0], key[1], key[2], str(status))
    return child


@web.middleware
async def request_context(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")
    if not _REQUEST_ID.match(rid):
        rid = uuid.uuid4().hex
    token = logs.request_id.set(rid)
    trace = logs.trace_id.set(logs.trace_of(request.headers.get("traceparent")) or logs.new_trace_id(rid))
    started = time.perf_counter()
    status = 500
    try:
        response = await _handle_errors(request, handler)
        status = response.status
        response.headers["X-Request-Id"] = rid
        return response
    except web.HTTPException as exc:  # a redirect raised by the handler (errors were answered above)
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer (nginx's code for it), not a server error
        raise
    finally:
        elapsed = time.perf_counter() - started
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        service = service_name(request.app)
        _http_seconds(service, route, request.method, status).observe(elapsed)
        if route not in ("/metrics", "/healthz", "/readyz"):
            # The path only: query strings can carry tokens (claim exchange, X-Plex-Token).
            log.info(
                "request",
                extra={"method": request.method, "path": request.path[:200], "status": status,
                       "ms": round(elapsed * 1000, 2)},
            )
        logs.trace_id.reset(trace)
        logs.request_id.reset(token)


async def _handle_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    html = request.app.get(HTML_ERRORS)
    try:
        check_request(request)
        return await handler(request)
    except HearthError as exc:
        error = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(exc)
    except (UnicodeDecodeError, ValueError) as exc:
        # Malformed bodies that slipped through parsing: the client's fault, not ours.
        log.info("malformed request", extra={"error": type(exc).__name__})
        error = ValidationFailed("the request could not be parsed")
    except Exception:
        log.exception("unhandled error")
        error = HearthError("internal error", status=500, code="internal_error", plex_code=1500)
    if html is not None and error_family(request) == "problem":
        return await html(request, error)  # type: ignore[no-any-return, operator]
    return render_error(request, error)


_IDENTITY = ("", "identity")


def check_request(request: web.Request) -> None:
    """What no route accepts, refused in the route's error shape before the handler runs:

    - a body with a ``Content-Encoding`` (bodies are never decompressed here, so a gzip or deflate
      body that is not one cannot break the connection: 415, and the raw bytes are drained);
    - a body whose declared charset is unknown;
    - a NUL or other control character in the path, in the query string or in an ``X-Plex-*`` header.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _IDENTITY:
        raise HearthError("request bodies must not be compressed (Content-Encoding)", status=415,
                          code="unsupported_media_type", plex_code=1415)
    if request.body_exists:
        plex.check_charset(request)
    plex.check_text("path", request.path)
    for key, value in request.query.items():
        plex.check_text(key, key)
        plex.check_text(key, value)
    for key, value in request.headers.items():
        if key.lower().startswith("x-plex-"):
            plex.check_text(key, value)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "service": service_name(request.app)})


async def readyz(request: web.Request) -> web.Response:
    failing = []
    for name, check in request.app[READY_CHECKS]:
        try:
            ok = await check()
        except Exception:
            ok = False
        if not ok:
            failing.append(name)
    status = 200 if not failing else 503
    return web.json_response({"ready": not failing, "failing": failing}, status=status)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class SettingsOf(Generic[S]):
    """The one way to read a service's settings from a request or an app: ``_settings =
    SettingsOf(Settings)`` once per module, then ``_settings(request)`` (or ``_settings(app)``)."""

    def __init__(self, cls: type[S]) -> None:
        self.cls = cls

    def __call__(self, where: web.Request | web.Application) -> S:
        app = where.app if isinstance(where, web.Request) else where
        s = app[SETTINGS]
        if not isinstance(s, self.cls):
            raise TypeError(f"this app's settings are {type(s).__name__}, not {self.cls.__name__}")
        return s


def internal_only(request: web.Request) -> None:
    """The one check of every /internal route: refuse a caller without the internal API secret."""
    require_internal(request, request.app[SETTINGS].internal_api_secret.get_secret_value())


def base_app(settings: CommonSettings) -> web.Application:
    """An application with the shared middlewares and operational routes, and no resources yet."""
    # auto_decompress off: a body is read as sent, never inflated (see check_request).
    app = web.Application(middlewares=[request_context], client_max_size=settings.client_max_size,
                          handler_args={"auto_decompress": False})
    app[SETTINGS] = settings
    app[READY_CHECKS] = []
    app[CONSUMERS] = []
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def _trusted_networks(request: web.Request) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    settings = request.app.get(SETTINGS)
    if settings is None:
        return _LOOPBACK
    return settings.trusted_networks()


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@functools.lru_cache(maxsize=4096)
def _is_trusted(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether ``address`` is in ``networks`` (remembered: the same few peers ask all the time)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def client_address(request: web.Request) -> str:
    """The caller's address. ``X-Forwarded-For`` hops are believed only as far as each one was
    added by a trusted proxy (TRUSTED_PROXIES): walking from the nearest hop back, the first
    address that is not a trusted proxy is the client, so a client cannot choose its own address.
    Worked out once per request."""
    known = request.get(_CLIENT_ADDRESS)
    if known is None:
        known = request[_CLIENT_ADDRESS] = _client_address(request)
    return known


_CLIENT_ADDRESS: web.RequestKey[str] = web.RequestKey("hearth_client_address", str)


def _client_address(request: web.Request) -> str:
    remote = request.remote or ""
    networks = _trusted_networks(request)
    if not _is_trusted(remote, networks):
        return remote or "unknown"
    address = remote
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            hop_ip = str(ipaddress.ip_address(hop))
        except ValueError:
            break  # garbage: believe nothing further back
        address = hop_ip
        if not _is_trusted(hop_ip, networks):
            break
    return address


def is_https(request: web.Request) -> bool:
    """Reached over HTTPS: directly, or through a trusted TLS-terminating proxy's X-Forwarded-Proto."""
    if request.secure:
        return True
    if not _is_trusted(request.remote or "", _trusted_networks(request)):
        return False
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return proto == "https"


def add_ready_check(app: web.Application, name: str, check: ReadyCheck) -> None:
    app[READY_CHECKS].append((name, check))


# ---------------------------------------------------------------------------------------------
# cleanup_ctx generators
# ---------------------------------------------------------------------------------------------


def pool_ctx(migrations: Sequence[tuple[str, Path]]) -> Callable[[web.Application], AsyncIterator[None]]:
    """Create the service database if needed, open the pool, apply migrations."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        s = app[SETTINGS]
        await db.ensure_database(s.db_url())
        pool = await db.create_pool(s.db_url(), min_size=s.db_pool_min, max_size=s.db_pool_max)
        await db.migrate(pool, migrations)
        app[POOL] = pool

        async def ping() -> bool:
            async with pool.acquire(timeout=2) as conn:
                return bool(await conn.fetchval("SELECT 1"))

        add_ready_check(app, "database", ping)
        yield
        await pool.close()

    return ctx


async def producer_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    await kafka.ensure_topics(
        s.kafka_bootstrap_servers, [s.topic(t) for t in ALL_TOPICS], partitions=s.topic_partitions
    )
    producer = kafka.make_producer(s.kafka_bootstrap_servers, client_id=s.service_name)
    await kafka.start_producer(producer)
    app[PRODUCER] = producer

    async def broker() -> bool:
        return bool(await producer.client.fetch_all_metadata())

    add_ready_check(app, "kafka", broker)
    yield
    await producer.stop()


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    relay = OutboxRelay(
        s.db_url(), app[POOL], app[PRODUCER], service=s.service_name, poll_interval=s.outbox_poll_interval,
        retention_seconds=s.outbox_retention, processed_retention=s.processed_events_retention,
    )
    relay.start()
    app[RELAY] = relay
    yield
    await relay.stop()


def consumer_ctx(
    factory: Callable[[web.Application], ConsumerRunner],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Start a consumer built by ``factory`` once the pool and producer exist; stop it first."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runner = factory(app)
        await runner.start()
        app[CONSUMERS].append(runner)

        async def assigned() -> bool:
            return runner.started.is_set()

        add_ready_check(app, f"consumer:{runner.group}", assigned)
        yield
        await runner.stop()

    return ctx


def periodic_ctx(
    name: str, interval: Callable[[web.Application], float], job: Callable[[web.Application], Awaitable[None]],
    *, at_exit: bool = False,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A background job run every ``interval(app)`` seconds (failures are logged, the job goes on);
    with ``at_exit`` it runs once more at shutdown."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval(app))
                try:
                    await job(app)
                except Exception:
                    log.exception("periodic job failed", extra={"job": name})

        task = asyncio.create_task(loop(), name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if at_exit:
            with contextlib.suppress(Exception):
                await job(app)

    return ctx


json_object = plex.json_object  # the request body as a JSON object, or a 400


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop (libuv): the same asyncio API with cheaper socket I/O and callbacks, which
    is most of a service's CPU besides hashing and SQL. HEARTH_LOOP=asyncio selects the standard one."""
    import os

    if os.environ.get("HEARTH_LOOP", "uvloop") == "asyncio":
        return asyncio.new_event_loop()
    import uvloop

    return uvloop.new_event_loop()


def run(app: web.Application, settings: CommonSettings) -> None:
    """Serve until SIGINT/SIGTERM; aiohttp then runs cleanup in reverse order."""
    logs.setup(settings.service_name, settings.log_level)
    web.run_app(
        app,
        loop=new_event_loop(),
        host=settings.http_host,
        port=settings.http_port,
        access_log=None,
        print=lambda *_: log.info("listening", extra={"port": settings.http_port}),
        shutdown_timeout=10,
    )
