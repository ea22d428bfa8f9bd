"""The auth app: "Sign in with Plex" popups (``/auth#?clientID=...&code=...&forwardUrl=...``).

Overseerr, Jellyseerr, Ombi, Tautulli, Organizr, Home Assistant (plexauth) and python-plexapi's
``MyPlexPinLogin(oauth=True)`` create a strong PIN, then open this page with the PIN's code and their
client identifier in the URL *fragment*, in one of three forms: ``/auth#?``, ``/auth#!?`` and
``/auth/#!?``. A fragment never reaches a server, so ``static/auth.js`` reads it and loads the same
page with the values in the query string; from there on everything is plain GET and POST, without
JavaScript:

1. ``GET /auth?clientID&code[&forwardUrl][&context[device][...]]``: a signed-out person is sent to
   the sign-in page, which comes back here with the request unchanged (the ``next`` parameter).
2. Signed in, the page shows what asks for access: the product, device name and platform the PIN was
   created with (its own ``X-Plex-*`` headers; the fragment's ``context[device][...]`` only fills
   what the PIN left empty), and the host that ``forwardUrl`` goes to. Approve and Deny are one
   CSRF-protected form.
3. ``POST /auth``: denying ends the PIN at once (the app's next poll answers 404, so it stops
   waiting); approving links the PIN, only a strong PIN whose client identifier equals
   ``clientID`` (linkcode checks both), then redirects to ``forwardUrl`` exactly as given, or says the
   window can be closed (the app polls the PIN and closes its popup).

Denial, an unknown or expired code, a ``clientID`` that is not the PIN's client, and a
``forwardUrl`` that is not an absolute http(s) URL each get a page saying so, never a redirect.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from aiohttp import web

from services.web import routes
from shared.app import client_address
from shared.errors import HearthError

CONTEXT_FIELDS = ("product", "version", "platform", "platformVersion", "device", "deviceName", "model",
                  "screenResolution", "layout", "environment")
MAX_CLIENT = 255
MAX_CODE = 64
MAX_FORWARD = 2048
MAX_CONTEXT = 200
_CODE = re.compile(r"^[A-Za-z0-9]+$")


class Request:
    """The auth app's parameters, validated."""

    def __init__(self, values: Any) -> None:
        self.client_id = str(values.get("clientID") or "").strip()
        self.code = str(values.get("code") or "").strip()
        self.forward_url = str(values.get("forwardUrl") or "")
        self.context = {f: str(values.get(f"context[device][{f}]") or "")[:MAX_CONTEXT] for f in CONTEXT_FIELDS}
        self.problem: str | None = None
        if not self.client_id or not self.code:
            self.problem = ("This sign-in link is incomplete: it has no code or no client. Go back to the app and "
                            "start signing in again.")
        elif len(self.client_id) > MAX_CLIENT or len(self.code) > MAX_CODE or not _CODE.match(self.code):
            self.problem = "This sign-in link is not valid. Go back to the app and start signing in again."
        elif self.forward_url and forward_host(self.forward_url) is None:
            self.problem = ("This sign-in link would send you on to an address that is not a web page "
                            "(only http and https addresses are allowed), so it was stopped. Nothing was linked.")

    def query(self) -> str:
        pairs = [("clientID", self.client_id), ("code", self.code)]
        if self.forward_url:
            pairs.append(("forwardUrl", self.forward_url))
        pairs += [(f"context[device][{k}]", v) for k, v in self.context.items() if v]
        return urllib.parse.urlencode(pairs)

    def hidden(self) -> list[tuple[str, str]]:
        return urllib.parse.parse_qsl(self.query())


def forward_host(url: str) -> str | None:
    """The host (and port) ``url`` goes to, or ``None`` unless it is an absolute http(s) URL that can
    be sent unchanged in a Location header (printable ASCII, no backslash)."""
    if len(url) > MAX_FORWARD or any(not 0x21 <= ord(c) <= 0x7E or c == "\\" for c in url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not url[: len(scheme) + 3].lower() == scheme + "://" or not parts.hostname:
        return None
    return parts.hostname + (f":{port}" if port else "")


def _page(request: web.Request, context: dict[str, Any], status: int = 200) -> web.Response:
    return routes.page(request, "auth.html", {"state": "", "problem": None, "request": None, **context}, status=status)


def _problem(request: web.Request, title: str, message: str, status: int) -> web.Response:
    return _page(request, {"state": "refused", "title": title, "problem": message}, status=status)


def _signin_redirect(req: Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther("/signin?" + urllib.parse.urlencode({"next": "/auth?" + req.query()}))


def _refusal(err: HearthError) -> tuple[str, str, int]:
    if err.status == 404:
        return ("This sign-in request has expired",
                "The code in this link is unknown or has expired. Go back to the app and start signing in again; "
                "sign-in requests last 15 minutes.", 404)
    if err.code == "client_mismatch":
        return ("This sign-in request does not match the app",
                "The link was made for a different app than the one that asked to sign in, so nothing was linked. "
                "Go back to the app and start signing in again.", 409)
    if err.status == 429:
        return ("Too many attempts", routes._wait_message(err), 429)
    raise err


async def _describe(request: web.Request, req: Request, account_id: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"account_id": account_id, "client_identifier": req.client_id})
    code = urllib.parse.quote(req.code, safe="")
    info: dict[str, Any] = await request.app[routes.LINKCODE].call(
        "GET", f"/internal/codes/{code}?{query}", headers={"X-Forwarded-For": client_address(request)})
    return info


async def auth_page(request: web.Request) -> web.Response:
    q = request.query
    if not any(k in q for k in ("clientID", "code", "forwardUrl")):
        await routes.current(request)
        return _page(request, {"state": "reading"})  # the script reads the fragment
    req = Request(q)
    if req.problem:
        await routes.current(request)
        return _problem(request, "This sign-in link cannot be used", req.problem, 400)
    principal = await routes.current(request)
    if principal is None:
        raise _signin_redirect(req)
    try:
        info = await _describe(request, req, principal.account_id)
    except HearthError as err:
        title, message, status = _refusal(err)
        return _problem(request, title, message, status)
    ctx = req.context
    app = {"product": info.get("product") or ctx["product"] or "An app",
           "device_name": info.get("device_name") or ctx["deviceName"] or ctx["device"],
           "platform": info.get("platform") or ctx["platform"]}
    return _page(request, {"state": "confirm", "request": req, "app": app,
                           "forward_host": forward_host(req.forward_url) if req.forward_url else None})


async def auth_decide(request: web.Request) -> web.StreamResponse:
    form = await routes.check_csrf(request)
    req = Request(form)
    if req.problem:
        return _problem(request, "This sign-in link cannot be used", req.problem, 400)
    principal = await routes.current(request)
    if principal is None:
        raise _signin_redirect(req)
    deny = form.get("decision") != "approve"
    try:
        code = urllib.parse.quote(req.code, safe="")
        await request.app[routes.LINKCODE].call("POST", f"/internal/codes/{code}/approve", {
            "account_id": principal.account_id, "session_id": principal.session_id,
            "client_identifier": req.client_id, "deny": deny},
            headers={"X-Forwarded-For": client_address(request)})
    except HearthError as err:
        title, message, status = _refusal(err)
        return _problem(request, title, message, status)
    if deny:
        return _page(request, {"state": "denied"})
    if req.forward_url:
        # Sent exactly as the app gave it (forward_host checked that it is absolute http(s) ASCII).
        return web.Response(status=303, headers={"Location": req.forward_url})
    return _page(request, {"state": "approved"})


# The page holds an Approve button for a code in its URL: never inside another site's frame (a
# click-jacked approval), never cached, and its URL (with the code) never sent on as a Referer.
GUARD_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                 "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _guarded(handler: Any) -> Any:
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(GUARD_HEADERS)
            raise
        response.headers.update(GUARD_HEADERS)
        return response

    return guarded


def setup_routes(app: web.Application) -> None:
    for path in ("/auth", "/auth/"):
        app.router.add_get(path, _guarded(auth_page))
        app.router.add_post(path, _guarded(auth_decide))
