"""plex.tv's older account routes, in the shapes the browser sign-in apps parse.

Read from their sources (``docs/PLEX-API.md``, "Browser sign-in apps"):

- ``GET /users/account`` (``.json``, ``.xml``): Overseerr, Jellyseerr, Ombi, Organizr, Tautulli,
  go-plex-client. JSON ``{"user": {...}}`` with ``authentication_token`` (Ombi refuses an account
  without it) and a never-null ``email``; XML the ``/api/v2/user`` element plus an
  ``<authentication-token>`` child (and the ``<subscription active>`` child Tautulli reads).
- ``POST /users/sign_in`` (``.json``, ``.xml``): Ombi posts ``{"user": {"login", "password"}}``,
  Organizr the form fields ``user[login]``/``user[password]``, scripts use HTTP Basic. The same
  sign-in as ``/api/v2/users/signin`` (``Auth.authenticate``: same throttling, same argon2 work for
  unknown logins), 201 with ``{"user": ...}``, 401 on bad credentials.
- ``GET /api/users``: always XML (Tautulli's user refresh gives up when it does not parse).
- ``GET /api/servers/{machineIdentifier}/shared_servers``: an empty list; Hearth has no sharing yet.

Outside ``/api/v2/`` the path decides between XML and JSON, never ``Accept`` (``shared.plex``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web

from services.auth import routes, store
from shared import plex
from shared.app import client_address
from shared.errors import MissingClientIdentifier


def account_view(account: store.Account, token: str) -> tuple[Any, dict[str, Any]]:
    """``/users/account`` in XML (the v2 user element with the legacy children) and JSON."""
    xml, v2 = routes.user_view(account, token)
    xml.set("authenticationToken", token)
    xml.set("authentication_token", token)
    xml.append(plex.element("authentication-token", text=token))
    xml.append(plex.element("joined-at", {"type": "datetime"}, text=account.created_at.isoformat()))
    joined = account.created_at.isoformat()
    user: dict[str, Any] = {
        "id": account.num, "uuid": account.id.hex, "email": account.email or "", "username": account.username,
        "title": account.username, "friendlyName": account.username, "thumb": "", "locale": None,
        "hasPassword": True, "authToken": token, "authentication_token": token, "joined_at": joined,
        "confirmed_at": joined, "forum_id": None, "confirmed": True, "emailOnlyAuth": False,
        "twoFactorEnabled": v2.get("twoFactorEnabled", False), "home": False, "guest": False,
        "restricted": False, "homeAdmin": False,
        "homeSize": 1, "maxHomeSize": 15, "mailing_list_status": "inactive", "mailingListActive": False,
        "subscription": {"active": False, "status": "Inactive", "plan": None, "features": []},
        "subscriptions": [], "roles": {"roles": []}, "entitlements": [], "services": [],
        "profile": v2.get("profile"),
    }
    return xml, {"user": user}


async def _account_response(request: web.Request, account: store.Account, token: str, status: int
                            ) -> web.Response:
    xml, json = account_view(account, token)
    return plex.respond(request, xml=xml, json=json, status=status)


async def get_account(request: web.Request) -> web.Response:
    account, _, token = await routes._account_of(request)
    return await _account_response(request, account, token, 200)


def _basic(request: web.Request) -> tuple[str | None, str | None]:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None, None
    login, sep, password = decoded.partition(":")
    return (login, password) if sep else (None, None)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


async def _credentials(request: web.Request) -> tuple[str | None, str | None, str | None]:
    """Login, password and (two-step accounts) verification code: Ombi's JSON, Organizr's form, or
    HTTP Basic, in that order. Old apps that cannot ask for a code append it to the password."""
    if request.body_exists and request.content_type == "application/json":
        body = await plex.json_object(request)
        nested = body.get("user")
        user: dict[str, Any] = nested if isinstance(nested, dict) else body
        login = user.get("login") or user.get("email") or user.get("username")
        return _str(login), _str(user.get("password")), _str(user.get("verificationCode") or body.get(
            "verificationCode"))
    f = await plex.form(request)
    login = f.get("user[login]") or f.get("login") or f.get("user[email]") or f.get("user[username]")
    password = f.get("user[password]") or f.get("password")
    code = f.get("user[verificationCode]") or f.get("verificationCode") or request.query.get("verificationCode")
    if login or password:
        return login, password, code
    basic_login, basic_password = _basic(request)
    return basic_login, basic_password, code


async def sign_in(request: web.Request) -> web.Response:
    login, password, code = await _credentials(request)
    if not await plex.param(request, "X-Plex-Client-Identifier"):
        raise MissingClientIdentifier()
    account = await request.app[routes.AUTH].authenticate(login, password, client_address(request), code)
    token = await routes._mint(request, account, remember=True)
    return await _account_response(request, account, token, 201)


async def users(request: web.Request) -> web.Response:
    await routes._principal(request)
    root = plex.element("MediaContainer", {"friendlyName": "myPlex", "identifier": "com.plexapp.plugins.myplex",
                                           "size": 0})
    return web.Response(body=plex.xml_bytes(root), content_type="application/xml")


async def shared_servers(request: web.Request) -> web.Response:
    await routes._principal(request)
    machine = request.match_info["machine_identifier"][:255]
    root = plex.element("MediaContainer", {"friendlyName": "myPlex", "identifier": "com.plexapp.plugins.myplex",
                                           "machineIdentifier": machine, "size": 0})
    return plex.respond(request, xml=root, json={"MediaContainer": {"size": 0, "machineIdentifier": machine,
                                                                    "SharedServer": []}})


def setup_routes(app: web.Application) -> None:
    r = app.router
    for suffix in ("", ".json", ".xml"):
        r.add_get(f"/users/account{suffix}", get_account)
        r.add_post(f"/users/sign_in{suffix}", sign_in)
    r.add_get("/api/users", users)
    r.add_get("/api/users/", users)
    r.add_get("/api/servers/{machine_identifier}/shared_servers", shared_servers)
    r.add_get("/api/servers/{machine_identifier}/shared_servers/", shared_servers)
