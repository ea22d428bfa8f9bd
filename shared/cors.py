"""CORS for the Plex API routes that browser apps call with ``fetch()`` from their own origin.

Overseerr, Jellyseerr, Ombi and others create and poll PINs and read the account from the app's
page (``docs/PLEX-API.md``, "Browser sign-in apps"). Those routes answer every origin:

- an ``OPTIONS`` preflight answers 204 allowing ``GET, POST, PUT, DELETE, OPTIONS`` and whatever
  headers the browser asks for (the ``X-Plex-*`` family, ``Accept``, ``Content-Type``);
- every other answer, errors included, carries ``Access-Control-Allow-Origin: *``;
- never credentials mode: no ``Access-Control-Allow-Credentials``, and the ``Cookie`` header is
  dropped before the handler runs, so no cookie can authorise anything on these routes (they take
  ``X-Plex-Token``). With ``*`` a browser refuses to send credentials anyway.

Only the path prefixes below get it; the account web pages (which use the session cookie) never do.

It is one aiohttp middleware, added outermost by each Plex API service (auth, linkcode,
devicesession), rather than nginx configuration: the same answer then comes whether the service is
behind nginx, a Kubernetes Ingress or reached directly, and errors rendered by the error middleware
are covered because this one wraps it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

PREFIXES = ("/api/", "/users/", "/devices", "/pins")
ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
DEFAULT_HEADERS = ("Accept, Accept-Language, Content-Type, X-Plex-Token, X-Plex-Client-Identifier, X-Plex-Product, "
                   "X-Plex-Version, X-Plex-Platform, X-Plex-Platform-Version, X-Plex-Device, X-Plex-Device-Name, "
                   "X-Plex-Model, X-Plex-Device-Screen-Resolution, X-Plex-Language, X-Plex-Provides")
EXPOSE_HEADERS = "Retry-After, X-Request-Id, Location"
MAX_AGE = "86400"
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def applies(path: str) -> bool:
    return path.startswith(PREFIXES) and not path.startswith("/internal/")


def _allow_headers(request: web.Request) -> str:
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    if asked and len(asked) <= 2000 and _HEADER_LIST.match(asked):
        return asked
    return DEFAULT_HEADERS


def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": _allow_headers(request),
        "Access-Control-Max-Age": MAX_AGE,
        "Vary": "Access-Control-Request-Headers",
    })


def _decorate(response: web.StreamResponse) -> None:
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    response.headers.popall("Access-Control-Allow-Credentials", None)


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not applies(request.path):
        return await handler(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return preflight(request)
    if "Cookie" in request.headers:
        headers = request.headers.copy()
        del headers["Cookie"]
        request = request.clone(headers=headers)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and anything the error middleware let through
        _decorate(exc)
        raise
    _decorate(response)
    return response


def install(app: web.Application) -> None:
    """Make CORS the outermost middleware of ``app`` (before it starts)."""
    app.middlewares.insert(0, cors)
