"""auth's HTTP handlers: parse -> call service -> render (Plex XML by default, JSON when asked)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web

from services.auth import store
from services.auth.errors import InvalidToken
from services.auth.minting import MintBatcher
from services.auth.service import Auth, Changed
from services.auth.settings import Settings
from shared import plex
from shared.app import SettingsOf, client_address, internal_only, json_object
from shared.errors import HearthError, MissingClientIdentifier, NotFound, ValidationFailed
from shared.holder import HOLDER, Principal
from shared.internal import InternalClient
from shared.principal import token_principal
from shared.tokens import same

AUTH = web.AppKey("auth", Auth)
DEVICESESSION = web.AppKey("devicesession", InternalClient)
MINTER = web.AppKey("minter", MintBatcher)
BACKGROUND = web.AppKey("background", set)


_settings = SettingsOf(Settings)


def _is_internal(request: web.Request) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and same(value.strip(), _settings(request).internal_api_secret.get_secret_value())


def user_view(account: store.Account, token: str | None) -> tuple[Any, dict[str, Any]]:
    """The user in Plex's XML shape (python-plexapi) and JSON shape (typed Go/Rust clients)."""
    joined = int(account.created_at.timestamp())
    tf_on = account.two_factor_on  # enabling two-step creates the recovery codes: both flags say the same
    attrs = {
        "id": account.num, "uuid": account.id.hex, "username": account.username, "title": account.username,
        "friendlyName": account.username, "email": account.email, "thumb": "", "authToken": token or "",
        "scrobbleTypes": "", "joinedAt": joined, "hasPassword": True, "confirmed": True, "emailOnlyAuth": False,
        "twoFactorEnabled": tf_on, "home": False, "guest": False, "restricted": False, "protected": False,
        "homeAdmin": False, "homeSize": 1, "maxHomeSize": 15, "mailingListActive": False, "country": "",
        "experimentalFeatures": False, "backupCodesCreated": tf_on, "locale": "",
    }
    xml = plex.element(
        "user", attrs,
        plex.element("subscription", {"active": False, "status": "Inactive", "plan": "", "paymentService": ""},
                     plex.element("features")),
        plex.element("profile", {"autoSelectAudio": True, "autoSelectSubtitle": 0,
                                 "defaultSubtitleAccessibility": 0, "defaultSubtitleForced": 0}),
        plex.element("entitlements"), plex.element("roles"), plex.element("services"),
    )
    json = {
        **attrs,
        "authToken": token,
        "subscription": {"active": False, "status": "Inactive", "features": [], "plan": None},
        "profile": {"autoSelectAudio": True, "autoSelectSubtitle": 0, "defaultSubtitleAccessibility": 0,
                    "defaultSubtitleForced": 0, "defaultAudioLanguage": None, "defaultSubtitleLanguage": None},
        "entitlements": [], "services": [], "roles": [], "anonymous": None, "subscriptions": [],
        "pin": None, "attributionPartner": None,
    }
    return xml, json


def _kind(request: web.Request, provides: str | None) -> str:
    requested = request.headers.get("X-Hearth-Device-Kind")
    if requested and _is_internal(request):
        return requested
    p = (provides or "").lower()
    for kind in ("server", "player", "controller"):
        if kind in p:
            return kind
    return "app"


async def _mint(request: web.Request, account: store.Account, remember: bool) -> str:
    info = await plex.client_info(request)
    if not info.client_identifier:
        raise MissingClientIdentifier()
    answer = await request.app[MINTER].mint({
        "account_id": str(account.id), "client_identifier": info.client_identifier,
        "kind": _kind(request, info.provides), "product": info.product or "", "version": info.version or "",
        "platform": info.platform or "", "platform_version": info.platform_version or "",
        "device": info.device or "", "device_name": info.device_name or "", "model": info.model or "",
        "vendor": info.vendor or "", "provides": info.provides or "", "public_address": client_address(request),
        "remember": remember,
    })
    return str(answer["token"])


_principal = token_principal


async def _account_of(request: web.Request) -> tuple[store.Account, Principal, str]:
    principal, token = await _principal(request)
    account = await store.find_by_id(request.app[AUTH].pool, uuid.UUID(principal.account_id))
    if account is None:
        raise InvalidToken()
    return account, principal, token


async def _user(request: web.Request, account: store.Account, token: str | None, status: int = 200
                ) -> web.Response:
    xml, json = user_view(account, token)
    return plex.respond(request, xml=xml, json=json, status=status)


# --------------------------------------------------------------------------------- Plex routes


async def create_user(request: web.Request) -> web.Response:
    f = await plex.form(request)
    await plex.client_info(request)  # the device fields are checked before anything is written
    with_session = bool(await plex.param(request, "X-Plex-Client-Identifier"))

    async def first_session(account: store.Account) -> str:
        return await _mint(request, account, remember=True)

    account, token = await request.app[AUTH].sign_up(
        f.get("email") or f.get("user[email]"), f.get("username") or f.get("user[username]"),
        f.get("password") or f.get("user[password]"), client_address(request),
        then=first_session if with_session else None)
    return await _user(request, account, token, status=201)


async def sign_in(request: web.Request) -> web.Response:
    f = await plex.form(request)
    login = f.get("login") or f.get("user[login]") or f.get("email") or f.get("username")
    password = f.get("password") or f.get("user[password]")
    if not (await plex.client_info(request)).client_identifier:  # every device field checked before hashing
        raise MissingClientIdentifier()
    remember = plex.parse_bool(f.get("rememberMe"), default=True)
    code = f.get("verificationCode") or f.get("user[verificationCode]")
    account = await request.app[AUTH].authenticate(login, password, client_address(request), code)
    token = await _mint(request, account, remember)
    return await _user(request, account, token, status=201)


async def get_user(request: web.Request) -> web.Response:
    account, _, token = await _account_of(request)
    return await _user(request, account, token)


async def sign_out(request: web.Request) -> web.Response:
    _, token = await _principal(request)
    # devicesession answers once the revocation is committed and Hearth's own holders (this one
    # included) have applied it; forgetting the token here as well keeps this service strict even
    # when that wait runs out.
    await request.app[DEVICESESSION].call("POST", "/internal/sessions/revoke", {"token": token})
    request.app[HOLDER].forget(token)
    return web.Response(status=204)


async def ping(request: web.Request) -> web.Response:
    await _principal(request)
    # Tautulli looks for an element named pong; python-plexapi reads the root's text "true".
    return plex.respond(request, xml=plex.element("pong", text="true"), json={"pong": True})


async def request_reset(request: web.Request) -> web.Response:
    f = await plex.form(request)
    email = f.get("email") or f.get("user[email]")
    auth = request.app[AUTH]
    await auth.request_reset(email, client_address(request))
    # The work that depends on whether the account exists happens after the answer, so neither the
    # answer nor its timing tells.
    assert email is not None
    task = asyncio.create_task(auth.send_reset(email))
    request.app[BACKGROUND].add(task)
    task.add_done_callback(request.app[BACKGROUND].discard)
    return web.Response(status=204)


async def _changed(request: web.Request, change: Changed, sign_out: bool) -> web.Response:
    """204 once the change is committed. With sign-out, wait (briefly) until devicesession has
    revoked the sessions and Hearth's own holders (auth, linkcode, web) have evicted them, so that
    when the answer arrives no Hearth service accepts an old token; third-party holders follow
    within milliseconds. If devicesession is slow, answer anyway: the event is committed and will
    be applied."""
    headers = {"X-Hearth-Event-Id": change.event_id}
    if sign_out:
        revoked = await _revoked(request, change)
        if revoked is not None:
            headers["X-Hearth-Sessions-Revoked"] = str(revoked)
    return web.Response(status=204, headers=headers)


async def _revoked(request: web.Request, change: Changed) -> int | None:
    """The sessions the change revoked, once Hearth's own holders applied that; None when
    devicesession could not tell in time. The committed event is handed to devicesession directly
    (one call instead of waiting for its copy to travel through Kafka); that copy still comes, and
    whichever of the two arrives second does nothing. Without the event in hand (an earlier try of
    this request committed it), or when the call fails, wait for the consumed copy's revocation."""
    ds = request.app[DEVICESESSION]
    if change.envelope is not None:
        try:
            outcome = await ds.call("POST", "/internal/revocations/by-event", change.envelope.encode())
            return int(outcome["revoked"])
        except HearthError:
            pass
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _settings(request).revocation_wait
    delay = 0.005
    while loop.time() < deadline:
        try:
            outcome = await ds.call("GET", f"/internal/revocations?causing_event_id={change.event_id}")
            if outcome["revoked"]:
                # Read-your-writes: answer once Hearth's own holders have evicted the tokens.
                await ds.call("POST", f"/internal/revocations/{outcome['revocation_id']}/applied")
            return int(outcome["revoked"])
        except HearthError as exc:
            if exc.status != 404:
                return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return None


async def reset_password(request: web.Request) -> web.Response:
    f = await plex.form(request)
    sign_out = plex.parse_bool(f.get("signOutDevices"))
    change = await request.app[AUTH].reset_password(f.get("resetToken") or f.get("token"), f.get("password"),
                                                    sign_out)
    return await _changed(request, change, sign_out)


async def change_password(request: web.Request) -> web.Response:
    _, principal, _ = await _account_of(request)
    f = await plex.form(request)
    sign_out = plex.parse_bool(f.get("signOutDevices"))
    change = await request.app[AUTH].change_password(
        uuid.UUID(principal.account_id), principal.session_id, f.get("currentPassword"), f.get("password"),
        sign_out, client_address(request))
    return await _changed(request, change, sign_out)


# --------------------------------------------------------------------------------- internal


def _account_json(a: store.Account) -> dict[str, Any]:
    return {"id": str(a.id), "uuid": a.id.hex, "num": a.num, "username": a.username, "email": a.email,
            "created_at": a.created_at.isoformat(), "reset_required": a.reset_required_at is not None}


def path_account_id(request: web.Request) -> uuid.UUID:
    """The ``{account_id}`` of an /internal route; not a UUID is "no such account" (404)."""
    try:
        return uuid.UUID(request.match_info["account_id"])
    except ValueError:
        raise NotFound("no such account") from None


async def internal_account(request: web.Request) -> web.Response:
    internal_only(request)
    account_id = path_account_id(request)
    account = await store.find_by_id(request.app[AUTH].pool, account_id)
    if account is None:
        raise NotFound("no such account")
    return web.json_response(_account_json(account))


async def internal_find_account(request: web.Request) -> web.Response:
    internal_only(request)
    from services.auth.service import normalise_login

    login = request.query.get("login", "")
    if not login or len(login) > 254:
        raise ValidationFailed("login is required", field="login")
    account = await store.find_by_login(request.app[AUTH].pool, normalise_login(login))
    if account is None:
        raise NotFound("no such account")
    return web.json_response(_account_json(account))


async def internal_require_reset(request: web.Request) -> web.Response:
    internal_only(request)
    account_id = path_account_id(request)
    body = await json_object(request)
    reason = str(body.get("reason") or "")[:500]
    if not reason:
        raise ValidationFailed("reason is required", field="reason")
    incident = body.get("incident_id")
    flagged = await request.app[AUTH].require_reset(
        account_id, reason=reason, incident_id=str(incident)[:100] if incident else None,
        notify=bool(body.get("notify")), revoke_sessions=bool(body.get("revoke_sessions")))
    if not flagged:
        raise NotFound("no such account")
    return web.json_response({"flagged": True})


def setup_routes(app: web.Application) -> None:
    r = app.router
    for suffix in ("", ".json", ".xml"):
        r.add_post(f"/api/v2/users{suffix}", create_user)
        r.add_post(f"/api/v2/users/signin{suffix}", sign_in)
        r.add_get(f"/api/v2/user{suffix}", get_user)
        r.add_delete(f"/api/v2/users/signout{suffix}", sign_out)
        r.add_get(f"/api/v2/ping{suffix}", ping)
        r.add_post(f"/api/v2/users/password/reset{suffix}", request_reset)
        r.add_put(f"/api/v2/users/password{suffix}", reset_password)
        r.add_put(f"/api/v2/user/password{suffix}", change_password)
    from services.auth import legacy

    legacy.setup_routes(app)  # /users/account, /users/sign_in, /api/users, /api/servers/*/shared_servers
    r.add_get("/internal/accounts", internal_find_account)
    r.add_get("/internal/accounts/{account_id}", internal_account)
    r.add_post("/internal/accounts/{account_id}/reset-required", internal_require_reset)
    from services.auth import passkeys, two_factor_routes

    two_factor_routes.setup(app)
    passkeys.setup(app)
