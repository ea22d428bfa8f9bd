"""web's pages: parse the form -> call the other services -> render a template.

Every POST carries a CSRF token bound to the browser (HMAC of its ``hearth_csrf`` cookie under
CSRF_SECRET); a POST without the right one is refused with 403 before anything else happens. Every
failure a service reports is shown on the page next to the field it concerns.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from datetime import datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from services.web.settings import Settings
from shared import plex
from shared.app import SettingsOf, client_address, is_https
from shared.errors import Forbidden, HearthError
from shared.holder import HOLDER, Principal
from shared.internal import InternalClient
from shared.tokens import same

AUTH = web.AppKey("auth_client", InternalClient)
DEVICESESSION = web.AppKey("devicesession_client", InternalClient)
LINKCODE = web.AppKey("linkcode_client", InternalClient)

SESSION_COOKIE = "hearth_session"
DEVICE_COOKIE = "hearth_device"
CSRF_COOKIE = "hearth_csrf"
_PRINCIPAL = web.RequestKey("principal", object)
_NEW_CSRF = web.RequestKey("new_csrf", str)


_settings = SettingsOf(Settings)


def _secure(request: web.Request) -> bool:
    """Cookies are Secure whenever the edge is reached over HTTPS, directly or through a trusted
    TLS-terminating proxy (X-Forwarded-Proto is believed only from TRUSTED_PROXIES)."""
    return is_https(request)


# Every page: no framing, no inline script or style, no third-party anything, no referrer outside.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                               " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


# --------------------------------------------------------------------------------- CSRF


def _csrf_cookie(request: web.Request) -> str:
    value = request.cookies.get(CSRF_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", value):
        value = request.get(_NEW_CSRF) or secrets.token_urlsafe(32)
        request[_NEW_CSRF] = value
    return value


def csrf_token(request: web.Request) -> str:
    """HMAC of the browser's CSRF cookie and of the session it is signed in with (none when signed
    out): a form token taken while signed in dies with the session (revocation, sign-out)."""
    principal = request.get(_PRINCIPAL)
    session = principal.session_id if isinstance(principal, Principal) else ""
    message = f"{_csrf_cookie(request)}|{session}".encode()
    mac = hmac.new(_settings(request).csrf_secret.get_secret_value().encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


async def check_csrf(request: web.Request) -> dict[str, str]:
    form = await plex.form(request)
    fields = {k: v for k, v in form.items()}
    await current(request)
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not same(fields.get("csrf_token", ""), csrf_token(request)):
        raise Forbidden("This form has expired or did not come from this site. Reload the page and try again.",
                        code="csrf_failed")
    return fields


@web.middleware
async def cookies_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Sets the CSRF and device cookies when a page created them (redirects included)."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            _set_cookies(request, exc)
        raise
    _set_cookies(request, response)
    return response


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer (pages, redirects, error pages, static files)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _set_cookies(request: web.Request, response: web.StreamResponse) -> None:
    new = request.get(_NEW_CSRF)
    if new:
        response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="Lax", secure=_secure(request), path="/")
    if DEVICE_COOKIE not in request.cookies:
        device = request.get(_DEVICE) or f"browser-{uuid.uuid4().hex}"
        response.set_cookie(DEVICE_COOKIE, device, httponly=True, samesite="Lax", secure=_secure(request),
                            max_age=5 * 365 * 24 * 3600, path="/")


_DEVICE = web.RequestKey("device", str)


def device_id(request: web.Request) -> str:
    value = request.cookies.get(DEVICE_COOKIE, "")
    if not re.fullmatch(r"browser-[0-9a-f]{32}", value):
        value = request.get(_DEVICE) or f"browser-{uuid.uuid4().hex}"
        request[_DEVICE] = value
    return value


def _browser_headers(request: web.Request) -> dict[str, str]:
    ua = request.headers.get("User-Agent", "")
    browser = next((b for b in ("Edg", "Firefox", "Chrome", "Safari") if b in ua), "Browser")
    browser = {"Edg": "Edge"}.get(browser, browser)
    platform = next((p for p in ("Windows", "Android", "iPhone", "Mac OS X", "Linux") if p in ua), "")
    platform = {"Mac OS X": "macOS", "iPhone": "iOS"}.get(platform, platform)
    return {"X-Plex-Client-Identifier": device_id(request), "X-Plex-Product": "Hearth Web",
            "X-Plex-Device-Name": f"{browser} on {platform}" if platform else browser, "X-Plex-Platform": platform,
            "X-Plex-Device": browser, "X-Hearth-Device-Kind": "browser",
            "X-Forwarded-For": client_address(request)}


# --------------------------------------------------------------------------------- sessions


async def current(request: web.Request) -> Principal | None:
    if _PRINCIPAL in request:
        return request[_PRINCIPAL]  # type: ignore[return-value]
    token = request.cookies.get(SESSION_COOKIE)
    principal = await request.app[HOLDER].validate(token) if token else None
    request[_PRINCIPAL] = principal
    return principal


async def require(request: web.Request) -> tuple[Principal, str]:
    principal = await current(request)
    if principal is None:
        raise web.HTTPSeeOther(f"/signin?next={request.path}")
    return principal, request.cookies[SESSION_COOKIE]


def _start_session(response: web.StreamResponse, request: web.Request, token: str) -> None:
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Lax", secure=_secure(request),
                        max_age=_settings(request).session_cookie_max_age, path="/")


def page(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    base = {"signed_in": request.get(_PRINCIPAL) is not None, "csrf_token": csrf_token(request), "errors": {},
            "form": {}, "notice": None, "notice_kind": "ok"}
    return aiohttp_jinja2.render_template(template, request, {**base, **context}, status=status)


def _wait_message(err: HearthError) -> str:
    if err.retry_after:
        return f"{err.detail.split(';')[0]}. Try again in {err.retry_after} seconds."
    return err.detail


# --------------------------------------------------------------------------------- pages


async def home(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/account" if await current(request) else "/signin")


async def signup_page(request: web.Request) -> web.Response:
    await current(request)
    return page(request, "signup.html", {"next": _next(request.query.get("next"))})


async def signup(request: web.Request) -> web.Response:
    form = await check_csrf(request)
    try:
        data, _ = await request.app[AUTH].request("POST", "/api/v2/users", {
            "email": form.get("email", ""), "username": form.get("username", ""),
            "password": form.get("password", "")}, headers=_browser_headers(request))
    except HearthError as err:
        field = err.field or {"email_taken": "email", "username_taken": "username"}.get(err.code, "form")
        return page(request, "signup.html", {"form": form, "errors": {field: _wait_message(err)},
                                             "next": _next(form.get("next"))}, status=400)
    response = web.HTTPSeeOther(_next(form.get("next")))  # e.g. back to the auth app's request
    _start_session(response, request, data["authToken"])
    raise response


def _next(value: str | None) -> str:
    """Where to go after signing in: a path on this site, else /account. Refused: anything but a
    plain path, and any path a browser would normalise into one starting with // (another host):
    empty segments and dot segments are refused outright. The query may also hold percent-encoded
    values ('%', '+', '~'): the auth app's request (services/web/authapp.py) comes back through
    sign-in that way. The path may not, as a browser decodes %2e into a dot segment."""
    if not value or not re.fullmatch(r"/[A-Za-z0-9/_.-]{0,200}(\?[A-Za-z0-9/_?=&.%+~-]{0,4000})?", value):
        return "/account"
    path = value.split("?", 1)[0]
    segments = path.split("/")[1:]
    if "//" in path or any(seg in (".", "..") for seg in segments):
        return "/account"
    return value


async def signin_page(request: web.Request) -> web.Response:
    await current(request)
    return page(request, "signin.html", {"next": _next(request.query.get("next"))})


async def signin(request: web.Request) -> web.Response:
    form = await check_csrf(request)
    target = _next(form.get("next"))
    try:
        # auth's sign-in path (the same checks as /api/v2/users/signin); with two-step verification on
        # it answers a pending sign-in instead of a session, and the code is asked next (two_factor_pages).
        data, _ = await request.app[AUTH].request("POST", "/internal/signin", {
            "login": form.get("login", ""), "password": form.get("password", ""), "rememberMe": True},
            headers=_browser_headers(request))
    except HearthError as err:
        message = {401: "The email, username or password is wrong."}.get(err.status, _wait_message(err))
        return page(request, "signin.html", {"form": {"login": form.get("login", "")}, "next": target,
                                             "errors": {"form": message}, "reset_required": err.status == 403},
                    status=err.status)
    if data.get("secondFactorRequired"):
        from services.web import two_factor_pages

        second = page(request, "signin.html", {"step": "code", "next": target})
        two_factor_pages.pending_cookie(second, request, data["pending"])
        return second
    response = web.HTTPSeeOther(target)
    _start_session(response, request, data["authToken"])
    raise response


async def signout_page(request: web.Request) -> web.Response:
    await current(request)
    return page(request, "signout.html", {})


async def signout(request: web.Request) -> web.Response:
    await check_csrf(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        try:
            await request.app[AUTH].request("DELETE", "/api/v2/users/signout", headers={"X-Plex-Token": token})
        except HearthError as err:
            # Already invalid: the cookie goes anyway. Anything else (a service down) means the
            # session still lives, so the browser keeps its cookie and is told to try again, rather
            # than shown "signed out" while its session stays usable.
            if err.status != 401:
                raise
        request.app[HOLDER].forget(token)
    response = web.HTTPSeeOther("/signin")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


async def forgot_page(request: web.Request) -> web.Response:
    await current(request)
    return page(request, "forgot.html", {})


async def forgot(request: web.Request) -> web.Response:
    form = await check_csrf(request)
    email = form.get("email", "").strip()
    try:
        await request.app[AUTH].request("POST", "/api/v2/users/password/reset", {"email": email},
                                        headers={"X-Forwarded-For": client_address(request)})
    except HearthError as err:
        field = "email" if err.status == 400 else "form"
        return page(request, "forgot.html", {"form": form, "errors": {field: _wait_message(err)}}, status=err.status)
    return page(request, "forgot.html", {"sent": True, "email": email})


async def reset_page(request: web.Request) -> web.Response:
    await current(request)
    token = request.query.get("token", "")[:200]
    return page(request, "reset.html", {"token": token})


def _check_confirmation(form: dict[str, str]) -> dict[str, str]:
    if not form.get("password"):
        return {"password": "Choose a new password."}
    if form.get("password") != form.get("confirm"):
        return {"confirm": "The two passwords do not match."}
    return {}


async def reset(request: web.Request) -> web.Response:
    form = await check_csrf(request)
    token = form.get("token", "")[:200]
    errors = _check_confirmation(form)
    if errors:
        return page(request, "reset.html", {"token": token, "errors": errors}, status=400)
    sign_out = form.get("signOutDevices") == "true"
    try:
        _, headers = await request.app[AUTH].request("PUT", "/api/v2/users/password", {
            "resetToken": token, "password": form["password"], "signOutDevices": sign_out},
            headers={"X-Forwarded-For": client_address(request)})
    except HearthError as err:
        field = "password" if err.code in ("1112", "weak_password") else "form"
        return page(request, "reset.html", {"token": token, "errors": {field: _wait_message(err)}}, status=400)
    revoked = headers.get("X-Hearth-Sessions-Revoked")
    return page(request, "reset.html", {"done": True, "signed_out": int(revoked) if sign_out and revoked else None})


def _when(value: str) -> str:
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value


async def _account_context(request: web.Request, principal: Principal, token: str) -> dict[str, Any]:
    user = await request.app[AUTH].call("GET", "/api/v2/user", headers={"X-Plex-Token": token})
    devices: list[dict[str, Any]] | None = None  # None: the list could not be read just now
    try:
        listing = await request.app[DEVICESESSION].call(
            "GET", f"/internal/accounts/{principal.account_id}/devices?session_id={principal.session_id}")
        devices = [{**d, "last_seen": _when(d["last_seen_at"])} for d in listing["devices"]]
    except HearthError as err:
        # The page still shows what the action just did (one-time recovery codes above all) when
        # devicesession cannot list the devices; the list says so instead.
        if err.status < 500:
            raise
    from services.web import two_factor_pages

    return {"user": user, "devices": devices, **await two_factor_pages.account_extras(request, principal)}


async def account_view(request: web.Request, principal: Principal, token: str, status: int = 200,
                       **extra: Any) -> web.Response:
    """The /account page, with ``extra`` (a notice, errors, a one-time enrollment) on top."""
    context = await _account_context(request, principal, token)
    return page(request, "account.html", {**context, **extra}, status=status)


async def account_page(request: web.Request) -> web.Response:
    principal, token = await require(request)
    return await account_view(request, principal, token)


async def remove_from_account(request: web.Request, client: web.AppKey[InternalClient], collection: str,
                              item_id: str, done: str, gone: str) -> web.Response:
    """Remove one of the signed-in account's numbered items (``/internal/accounts/<id>/<collection>/
    <item_id>`` of ``client``) and show /account saying so. Removing is idempotent: an item already
    gone, or never there, says ``gone`` rather than an error page, so a retried removal answers
    plainly; any other failure is the error page, and nothing was removed."""
    principal, token = await require(request)
    await check_csrf(request)
    notice, kind = gone, "bad"
    if item_id.isdigit() and len(item_id) < 18:
        try:
            path = f"/internal/accounts/{principal.account_id}/{collection}/{item_id}"
            await request.app[client].call("DELETE", path)
            notice, kind = done, "ok"
        except HearthError as err:
            if err.status != 404:
                raise
    return await account_view(request, principal, token, notice=notice, notice_kind=kind)


async def remove_device(request: web.Request) -> web.Response:
    return await remove_from_account(request, DEVICESESSION, "devices", request.match_info["device_id"],
                                     "The device was removed and signed out.", "That device was already removed.")


async def signout_others(request: web.Request) -> web.Response:
    principal, token = await require(request)
    await check_csrf(request)
    n = await revoke_others(request, principal)
    return await account_view(request, principal, token,
                              notice=f"{n} other session{'' if n == 1 else 's'} signed out.")


async def revoke_others(request: web.Request, principal: Principal) -> int:
    """Sign out every session of the account but this one; returns how many were signed out."""
    result = await request.app[DEVICESESSION].call("POST", "/internal/sessions/revoke", {
        "account_id": principal.account_id, "except_session_id": principal.session_id, "cause": "signout_all"})
    n: int = result["revoked"]
    return n


async def change_password(request: web.Request) -> web.Response:
    principal, token = await require(request)
    form = await check_csrf(request)
    errors = _check_confirmation(form)
    sign_out = form.get("signOutDevices") == "true"
    notice, kind = None, "ok"
    if not errors:
        try:
            _, headers = await request.app[AUTH].request("PUT", "/api/v2/user/password", {
                "currentPassword": form.get("currentPassword", ""), "password": form["password"],
                "signOutDevices": sign_out}, headers={"X-Plex-Token": token,
                                                      "X-Forwarded-For": client_address(request)})
            notice = "Your password was changed."
            revoked = headers.get("X-Hearth-Sessions-Revoked")
            if sign_out and revoked is not None:
                n = int(revoked)
                notice += f" {n} device{'' if n == 1 else 's'} {'was' if n == 1 else 'were'} signed out."
        except HearthError as err:
            if err.status == 401:
                errors = {"currentPassword": "The current password is wrong."}
            elif err.code in ("1112", "weak_password"):
                errors = {"password": err.detail}
            else:
                notice, kind = _wait_message(err), "bad"
    return await account_view(request, principal, token, 400 if errors else 200, errors=errors, notice=notice,
                              notice_kind=kind)


async def link_page(request: web.Request) -> web.Response:
    await require(request)
    code = re.sub(r"[^A-Za-z0-9 -]", "", request.query.get("code", ""))[:30]
    return page(request, "link.html", {"code": code})


async def link_lookup(request: web.Request) -> web.Response:
    principal, _ = await require(request)
    form = await check_csrf(request)
    code = form.get("code", "").strip()[:30]
    if not code:
        return page(request, "link.html", {"code": "", "errors": {"code": "Enter the code your device shows."}},
                    status=400)
    try:
        device = await request.app[LINKCODE].call(
            "GET", f"/internal/codes/{_path_code(code)}?account_id={principal.account_id}",
            headers={"X-Forwarded-For": client_address(request)})
    except HearthError as err:
        message = {404: "That code is wrong or has expired. Check the code on your device."}.get(
            err.status, _wait_message(err))
        return page(request, "link.html", {"code": code, "errors": {"code": message}}, status=err.status)
    return page(request, "link.html", {"code": code, "device": device})


def _path_code(code: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", code)[:30] or "-"


async def link_approve(request: web.Request) -> web.Response:
    principal, _ = await require(request)
    form = await check_csrf(request)
    code = form.get("code", "")[:30]
    deny = form.get("decision") == "deny"
    try:
        await request.app[LINKCODE].call("POST", f"/internal/codes/{_path_code(code)}/approve", {
            "account_id": principal.account_id, "session_id": principal.session_id, "deny": deny},
            headers={"X-Forwarded-For": client_address(request)})
    except HearthError as err:
        message = {404: "That code is wrong or has expired. Check the code on your device."}.get(
            err.status, _wait_message(err))
        return page(request, "link.html", {"code": code, "errors": {"code": message}}, status=err.status)
    if deny:
        return page(request, "link.html", {"code": "", "notice": "The request was denied."})
    return page(request, "link.html", {"linked": "Your device"})


async def claim_page(request: web.Request) -> web.Response:
    _, token = await require(request)
    data = await request.app[LINKCODE].call("GET", "/api/claim/token.json", headers={"X-Plex-Token": token})
    return page(request, "claim.html", {"token": data["token"], "ttl": _settings(request).claim_ttl})


async def html_error(request: web.Request, err: HearthError) -> web.Response:
    """Errors on pages are pages: a clear message, never a stack trace."""
    if _PRINCIPAL not in request:
        request[_PRINCIPAL] = None
    titles = {403: "Not allowed", 404: "Page not found", 429: "Too many attempts", 503: "Try again shortly"}
    title = titles.get(err.status, "Something went wrong" if err.status >= 500 else "That did not work")
    message = err.detail if err.status < 500 else "Something went wrong on our side. Please try again."
    return page(request, "error.html", {"title": title, "message": message}, status=err.status)


def setup_routes(app: web.Application) -> None:
    from pathlib import Path

    r = app.router
    r.add_get("/", home)
    r.add_get("/signup", signup_page)
    r.add_post("/signup", signup)
    r.add_get("/signin", signin_page)
    r.add_post("/signin", signin)
    r.add_get("/signout", signout_page)
    r.add_post("/signout", signout)
    r.add_get("/forgot", forgot_page)
    r.add_post("/forgot", forgot)
    r.add_get("/reset", reset_page)
    r.add_post("/reset", reset)
    r.add_get("/account", account_page)
    r.add_post("/account/password", change_password)
    r.add_post("/account/signout-others", signout_others)
    r.add_post("/account/devices/{device_id}/remove", remove_device)
    r.add_get("/link", link_page)
    r.add_post("/link", link_lookup)
    r.add_post("/link/approve", link_approve)
    r.add_get("/claim", claim_page)
    from services.web import authapp

    authapp.setup_routes(app)
    from services.web import two_factor_pages

    two_factor_pages.setup(app)
    r.add_static("/static", Path(__file__).parent / "static", append_version=False)
