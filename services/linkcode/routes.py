"""linkcode's HTTP handlers: parse -> call service -> render."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import quoteattr

from aiohttp import web

from services.linkcode.errors import CodeNotFound
from services.linkcode.service import LinkCodes
from services.linkcode.settings import Settings
from shared import plex
from shared.app import SettingsOf, client_address, internal_only, json_object
from shared.errors import ValidationFailed
from shared.holder import Principal
from shared.principal import token_principal

LINKCODES = web.AppKey("linkcodes", LinkCodes)


_settings = SettingsOf(Settings)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pin_view(request: web.Request, pin: Any, code: str, token: str | None, status: int) -> web.Response:
    expires_in = max(0, round(pin.expires_at.timestamp() - time.time()))
    d = pin.device
    attrs = {"id": pin.id, "code": code, "product": d.get("product", ""), "trusted": False,
             "clientIdentifier": pin.client_identifier, "expiresIn": expires_in, "createdAt": _iso(pin.created_at),
             "expiresAt": _iso(pin.expires_at), "authToken": token or "", "newRegistration": "", "qr": ""}
    location = {"code": "", "european_union_member": False, "continent_code": "", "country": "", "city": "",
                "time_zone": "", "postal_code": "", "in_privacy_restricted_country": False, "subdivisions": "",
                "coordinates": ""}
    json = {**attrs, "authToken": token, "newRegistration": None, "location": location,
            "qr": f"{_settings(request).public_base_url.rstrip('/')}/link?code={code}" if code else ""}
    return plex.respond(request, xml=plex.element("pin", attrs, plex.element("location", location)), json=json,
                        status=status)


async def _principal(request: web.Request) -> Principal:
    return (await token_principal(request))[0]


# --------------------------------------------------------------------------------- Plex PINs


async def create_pin(request: web.Request) -> web.Response:
    info = await plex.client_info(request)
    strong = plex.parse_bool(request.query.get("strong") or (await plex.form(request)).get("strong"))
    created = await request.app[LINKCODES].create_pin(info, strong, client_address(request))
    return _pin_view(request, created.pin, created.code, None, 201)


async def get_pin(request: web.Request) -> web.Response:
    raw = request.match_info["pin_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise CodeNotFound()
    client = await plex.param(request, "X-Plex-Client-Identifier")
    pin, token = await request.app[LINKCODES].collect_pin(int(raw), client)
    return _pin_view(request, pin, "", token, 200)


async def link_pin(request: web.Request) -> web.Response:
    principal = await _principal(request)
    code = await plex.field(request, "code", max_len=64)
    await request.app[LINKCODES].approve(code, principal, client_address(request))
    return web.Response(status=204)


# --------------------------------------------------------------------------------- RFC 8628 / 8414


async def device_code(request: web.Request) -> web.Response:
    f = await plex.form(request)
    body = await request.app[LINKCODES].device_authorization(f.get("client_id"), f.get("scope"),
                                                             client_address(request))
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def token(request: web.Request) -> web.Response:
    f = await plex.form(request)
    body = await request.app[LINKCODES].token(f.get("grant_type"), f.get("device_code"), f.get("client_id"))
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def metadata(request: web.Request) -> web.Response:
    base = _settings(request).public_base_url.rstrip("/")
    return web.json_response({
        "issuer": base,
        "device_authorization_endpoint": base + "/oauth/device/code",
        "token_endpoint": base + "/oauth/token",
        "introspection_endpoint": base + "/oauth/introspect",
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code"],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
    })


# --------------------------------------------------------------------------------- server claim


async def claim_token(request: web.Request) -> web.Response:
    principal = await _principal(request)
    session_token = await plex.param(request, "X-Plex-Token")
    assert session_token is not None
    value = await request.app[LINKCODES].claim_token(principal, session_token)
    return plex.respond(request, xml=plex.element("MediaContainer", {"token": value}), json={"token": value})


async def claim_exchange(request: web.Request) -> web.Response:
    info = await plex.client_info(request)
    claim = request.query.get("token") or (await plex.form(request)).get("token")
    account, server_token = await request.app[LINKCODES].exchange_claim(claim, info, client_address(request))
    user = {"id": account["num"], "uuid": account["uuid"], "username": account["username"],
            "title": account["username"], "email": account["email"]}
    if plex.wants_json(request):
        return web.json_response({**user, "authToken": server_token, "authentication_token": server_token},
                                 status=200)
    # The official image's first-run script greps an <authentication-token> element on its own line.
    attrs = " ".join(f"{k}={quoteattr(str(v))}" for k, v in {**user, "authToken": server_token}.items())
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<user {attrs}>\n'
            f"  <authentication-token>{server_token}</authentication-token>\n</user>\n")
    return web.Response(body=body, content_type="application/xml")


# --------------------------------------------------------------------------------- internal (web)


def _account_param(value: object) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValidationFailed("account_id must be a UUID", field="account_id") from None


def _client_param(value: object) -> str | None:
    """The auth app's clientID: when given, only a strong PIN of that client identifier matches."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 255:
        raise ValidationFailed("client_identifier must be 1 to 255 characters", field="client_identifier")
    return value


async def describe_code(request: web.Request) -> web.Response:
    internal_only(request)
    info = await request.app[LINKCODES].describe(request.match_info["code"][:64],
                                                 _account_param(request.query.get("account_id")),
                                                 client_address(request),
                                                 client=_client_param(request.query.get("client_identifier")))
    return web.json_response({"kind": info.kind, "product": info.product, "device_name": info.device_name,
                              "platform": info.platform, "client": info.client,
                              "expires_at": info.expires_at.isoformat()})


async def approve_code(request: web.Request) -> web.Response:
    internal_only(request)
    body = await json_object(request)
    account_id = _account_param(body.get("account_id"))
    principal = Principal(account_id=account_id, session_id=str(body.get("session_id") or ""), device_id=0,
                          client_id="web", kind="browser", issued_at=0.0)
    kind = await request.app[LINKCODES].approve(request.match_info["code"][:64], principal,
                                                client_address(request), deny=bool(body.get("deny")),
                                                client=_client_param(body.get("client_identifier")))
    return web.json_response({"kind": kind, "approved": not body.get("deny")})


def setup_routes(app: web.Application) -> None:
    r = app.router
    for suffix in ("", ".json", ".xml"):
        r.add_post(f"/api/v2/pins{suffix}", create_pin)
        r.add_put(f"/api/v2/pins/link{suffix}", link_pin)
    r.add_get(r"/api/v2/pins/{pin_id:\d+}.json", get_pin)
    r.add_get(r"/api/v2/pins/{pin_id:\d+}.xml", get_pin)
    r.add_get("/api/v2/pins/{pin_id}", get_pin)
    r.add_post("/oauth/device/code", device_code)
    r.add_post("/oauth/token", token)
    r.add_get("/.well-known/oauth-authorization-server", metadata)
    r.add_get("/api/claim/token", claim_token)
    r.add_get("/api/claim/token.json", claim_token)
    r.add_post("/api/claim/exchange", claim_exchange)
    r.add_get("/internal/codes/{code}", describe_code)
    r.add_post("/internal/codes/{code}/approve", approve_code)
