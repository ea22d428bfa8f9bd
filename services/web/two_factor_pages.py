"""web: two-step verification and passkeys on /account and /signin (issue 20).

- /account: set up (QR code of the otpauth URI drawn here as SVG by segno, the key as text, a field
  to confirm, "Sign out all other devices"), the recovery codes once with a download link, disable
  and regenerate; passkeys: add (WebAuthn in the browser, static/passkeys.js), list, remove.
- /signin: when the password was right and the account has two-step verification, the second step
  asks only for the code. What proves the password meanwhile is a pending sign-in token issued by
  auth (its HMAC stored there, single use, PENDING_SIGNIN_TTL), kept in an HttpOnly cookie scoped to
  /signin; the password itself is never kept.
- "Sign in with a passkey": discoverable credentials, no username typed; the session is minted by
  auth like any sign-in.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import orjson
import segno
from aiohttp import web

from services.web import routes
from services.web.routes import AUTH, account_view, check_csrf, page, remove_from_account, require
from shared.app import client_address
from shared.errors import HearthError
from shared.holder import Principal

PENDING_COOKIE = "hearth_pending"


def qr_svg(uri: str) -> str:
    """The QR code as inline SVG markup (no script, no external resource)."""
    svg: str = segno.make(uri, error="m").svg_inline(scale=5, dark="#18181b", light="#ffffff", border=2,
                                                       title="QR code for your authenticator app")
    return svg


def grouped(secret: str) -> str:
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


async def account_extras(request: web.Request, principal: Principal) -> dict[str, Any]:
    tf = await request.app[AUTH].call("GET", f"/internal/accounts/{principal.account_id}/two-factor")
    listing = await request.app[AUTH].call("GET", f"/internal/accounts/{principal.account_id}/passkeys")
    keys = [{**k, "created": routes._when(k["created_at"]),
             "last_used": routes._when(k["last_used_at"]) if k["last_used_at"] else "never"}
            for k in listing["passkeys"]]
    return {"two_factor": tf, "passkeys": keys}


def _headers(request: web.Request, token: str) -> dict[str, str]:
    return {"X-Plex-Token": token, "X-Forwarded-For": client_address(request)}


def _enrollment(secret: str, username: str) -> dict[str, Any]:
    uri = f"otpauth://totp/Hearth:{quote(username)}?secret={secret}&issuer=Hearth"
    return {"secret": secret, "secret_grouped": grouped(secret), "qr": qr_svg(uri), "uri": uri}


def _codes(codes: list[str]) -> dict[str, Any]:
    text = "Hearth recovery codes (each works once)\n\n" + "\n".join(codes) + "\n"
    return {"recovery_codes": codes, "recovery_download": "data:text/plain;charset=utf-8," + quote(text)}


async def start(request: web.Request) -> web.Response:
    principal, token = await require(request)
    await check_csrf(request)
    try:
        data = await request.app[AUTH].call("POST", "/api/v2/user/two-factor.json", headers=_headers(request, token))
    except HearthError as err:
        return await account_view(request, principal, token, err.status, notice=routes._wait_message(err),
                                  notice_kind="bad")
    user = await request.app[AUTH].call("GET", "/api/v2/user", headers={"X-Plex-Token": token})
    return await account_view(request, principal, token, enrollment=_enrollment(data["secret"], user["username"]))


async def confirm(request: web.Request) -> web.Response:
    principal, token = await require(request)
    form = await check_csrf(request)
    secret = re.sub(r"[^A-Z2-7]", "", form.get("secret", ""))[:64]
    try:
        data = await request.app[AUTH].call("PUT", "/api/v2/user/two-factor.json",
                                            {"code": form.get("code", "").strip()[:64]},
                                            headers=_headers(request, token))
    except HearthError as err:
        user = await request.app[AUTH].call("GET", "/api/v2/user", headers={"X-Plex-Token": token})
        message = {401: "That code is not right. Enter the 6 digits your app shows now."}.get(
            err.status, routes._wait_message(err))
        extra: dict[str, Any] = {"errors": {"code": message}}
        if secret and err.status != 400:
            extra["enrollment"] = _enrollment(secret, user["username"])
        else:
            extra = {"notice": message, "notice_kind": "bad"}
        return await account_view(request, principal, token, 400 if err.status < 500 else err.status, **extra)
    notice = "Two-step verification is on. Save your recovery codes now: they are shown only once."
    status, kind = 200, "ok"
    if form.get("signOutOthers") == "true":
        # Two-step verification is on by now, and its recovery codes can be shown only on this
        # answer: a failure to sign the other sessions out must not lose them. The page says what
        # did not happen and how to do it again (the button is idempotent).
        try:
            n = await routes.revoke_others(request, principal)
            notice += f" {n} other session{'' if n == 1 else 's'} signed out."
        except HearthError as err:
            if err.status < 500:
                raise
            notice += (" The other sessions could not be signed out just now: use \"Sign out all other devices\""
                       " in a moment.")
            status, kind = err.status, "bad"
    return await account_view(request, principal, token, status, notice=notice, notice_kind=kind,
                              **_codes(data["recoveryCodes"]))


async def _with_password_and_code(request: web.Request, method: str, path: str, done: str) -> web.Response:
    principal, token = await require(request)
    form = await check_csrf(request)
    try:
        data = await request.app[AUTH].call(method, path, {"password": form.get("password", "")[:1024],
                                                           "code": form.get("code", "").strip()[:64]},
                                            headers=_headers(request, token))
    except HearthError as err:
        if err.status == 401 and err.code == "1029":
            errors = {"tf_code": "That code is not right or was already used."}
        elif err.status == 401:
            errors = {"tf_password": "The password is wrong."}
        else:
            return await account_view(request, principal, token, err.status, notice=routes._wait_message(err),
                                      notice_kind="bad")
        return await account_view(request, principal, token, 400, errors=errors)
    extra = _codes(data["recoveryCodes"]) if data and "recoveryCodes" in data else {}
    return await account_view(request, principal, token, notice=done, **extra)


async def disable(request: web.Request) -> web.Response:
    return await _with_password_and_code(request, "DELETE", "/api/v2/user/two-factor.json",
                                         "Two-step verification is off.")


async def regenerate(request: web.Request) -> web.Response:
    return await _with_password_and_code(request, "POST", "/api/v2/user/two-factor/recovery-codes.json",
                                         "New recovery codes: the old ones no longer work. Save these now.")


# --------------------------------------------------------------------------------- sign-in steps


def pending_cookie(response: web.StreamResponse, request: web.Request, pending: str, ttl: int = 300) -> None:
    response.set_cookie(PENDING_COOKIE, pending, httponly=True, samesite="Strict", secure=routes._secure(request),
                        max_age=ttl, path="/signin")


async def second_step(request: web.Request) -> web.Response:
    form = await check_csrf(request)
    target = routes._next(form.get("next"))
    pending = request.cookies.get(PENDING_COOKIE, "")
    try:
        data = await request.app[AUTH].call("POST", "/internal/signin/second-factor", {
            "pending": pending[:100], "code": form.get("code", "").strip()[:64]},
            headers=routes._browser_headers(request))
    except HearthError as err:
        if err.code == "pending_signin_invalid" or err.status == 403:
            response = page(request, "signin.html", {"next": target, "errors": {
                "form": "This sign-in has expired. Enter your password again." if err.status != 403
                else err.detail}, "reset_required": err.status == 403}, status=err.status)
            response.del_cookie(PENDING_COOKIE, path="/signin")
            return response
        message = {401: "That code is not right or was already used."}.get(err.status, routes._wait_message(err))
        return page(request, "signin.html", {"step": "code", "next": target, "errors": {"code": message}},
                    status=err.status)
    response = web.HTTPSeeOther(target)
    response.del_cookie(PENDING_COOKIE, path="/signin")
    routes._start_session(response, request, data["authToken"])
    raise response


# --------------------------------------------------------------------------------- passkeys


def _json_error(err: HearthError) -> web.Response:
    status = err.status if 400 <= err.status < 600 else 400
    return web.json_response({"error": err.detail if err.status < 500 else "Something went wrong; try again."},
                             status=status)


async def passkey_register_options(request: web.Request) -> web.Response:
    principal, _ = await require(request)
    await check_csrf(request)
    try:
        options = await request.app[AUTH].call("POST", f"/internal/accounts/{principal.account_id}/passkeys/options",
                                               {})
    except HearthError as err:
        return _json_error(err)
    return web.json_response(options)


async def passkey_register(request: web.Request) -> web.Response:
    principal, _ = await require(request)
    form = await check_csrf(request)
    try:
        credential = orjson.loads(form.get("credential", "")[:20000] or "null")
        result = await request.app[AUTH].call("POST", f"/internal/accounts/{principal.account_id}/passkeys", {
            "credential": credential, "name": form.get("name", "")[:60]})
    except orjson.JSONDecodeError:
        return web.json_response({"error": "The browser sent no passkey."}, status=400)
    except HearthError as err:
        return _json_error(err)
    return web.json_response({"ok": True, "name": result["name"]}, status=201)


async def passkey_remove(request: web.Request) -> web.Response:
    return await remove_from_account(request, AUTH, "passkeys", request.match_info["passkey_id"],
                                     "The passkey was removed; it no longer signs you in.",
                                     "That passkey was already removed.")


async def passkey_signin_options(request: web.Request) -> web.Response:
    await check_csrf(request)
    try:
        options = await request.app[AUTH].call("POST", "/internal/passkeys/options", {})
    except HearthError as err:
        return _json_error(err)
    return web.json_response(options)


async def passkey_signin(request: web.Request) -> web.Response:
    form = await check_csrf(request)
    target = routes._next(form.get("next"))
    try:
        credential = orjson.loads(form.get("credential", "")[:20000] or "null")
        data = await request.app[AUTH].call("POST", "/internal/passkeys/signin", {"credential": credential},
                                            headers=routes._browser_headers(request))
    except orjson.JSONDecodeError:
        return web.json_response({"error": "The browser sent no passkey."}, status=400)
    except HearthError as err:
        return _json_error(err)
    response = web.json_response({"redirect": target})
    routes._start_session(response, request, data["authToken"])
    return response


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/signin/code", second_step)
    r.add_post("/signin/passkey/options", passkey_signin_options)
    r.add_post("/signin/passkey", passkey_signin)
    r.add_post("/account/two-factor/start", start)
    r.add_post("/account/two-factor/confirm", confirm)
    r.add_post("/account/two-factor/disable", disable)
    r.add_post("/account/two-factor/recovery-codes", regenerate)
    r.add_post("/account/passkeys/options", passkey_register_options)
    r.add_post("/account/passkeys", passkey_register)
    r.add_post("/account/passkeys/{passkey_id}/remove", passkey_remove)
