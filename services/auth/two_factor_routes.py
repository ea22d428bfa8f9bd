"""HTTP routes of two-step verification (issue 20); the logic is in ``two_factor``.

Plex-style (``X-Plex-Token``, form fields, XML by default, JSON on request):

- ``POST /api/v2/user/two-factor``: start enrollment; answers ``secret`` (base32) and ``uri``
  (``otpauth://totp/Hearth:<username>?secret=...&issuer=Hearth``). Nothing is enabled yet.
- ``PUT /api/v2/user/two-factor`` with ``code``: confirm; answers ``recoveryCodes`` (10, shown once).
- ``DELETE /api/v2/user/two-factor`` with ``password`` and ``code`` (current or recovery): 204.
- ``POST /api/v2/user/two-factor/recovery-codes`` with ``password`` and ``code``: new ``recoveryCodes``.
- ``GET /api/v2/user/two-factor``: ``enabled``, ``pending``, ``recoveryCodesLeft``.

Internal (web): ``GET /internal/accounts/{id}/two-factor``, ``POST /internal/signin`` (password
step; answers a session or ``{"secondFactorRequired": true, "pending": token}``),
``POST /internal/signin/second-factor`` (``pending`` + ``code``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.auth import routes, store
from services.auth.two_factor import TwoFactor, TwoFactorRequired
from shared import plex
from shared.app import client_address, internal_only, json_object
from shared.errors import MissingClientIdentifier


def _tf(request: web.Request) -> TwoFactor:
    return request.app[routes.AUTH].two_factor


def _codes(request: web.Request, codes: list[str], status: int = 200) -> web.Response:
    xml = plex.element("recoveryCodes", {"size": len(codes)},
                       *(plex.element("recoveryCode", {"code": c}) for c in codes))
    return plex.respond(request, xml=xml, json={"recoveryCodes": codes}, status=status)


async def start(request: web.Request) -> web.Response:
    account, _, _ = await routes._account_of(request)
    secret, uri = await _tf(request).start(account)
    ttl = routes._settings(request).two_factor_enroll_ttl
    attrs = {"secret": secret, "uri": uri, "issuer": "Hearth", "digits": 6, "period": 30, "expiresIn": ttl}
    return plex.respond(request, xml=plex.element("twoFactor", attrs), json=attrs, status=201)


async def confirm(request: web.Request) -> web.Response:
    account, _, _ = await routes._account_of(request)
    code = await plex.field(request, "code", max_len=64)
    return _codes(request, await _tf(request).confirm(account, code))


async def disable(request: web.Request) -> web.Response:
    account, _, _ = await routes._account_of(request)
    await _tf(request).disable(account, await plex.field(request, "password", max_len=1024),
                               await plex.field(request, "code", max_len=64), client_address(request))
    return web.Response(status=204)


async def regenerate(request: web.Request) -> web.Response:
    account, _, _ = await routes._account_of(request)
    codes = await _tf(request).regenerate(account, await plex.field(request, "password", max_len=1024),
                                          await plex.field(request, "code", max_len=64), client_address(request))
    return _codes(request, codes)


def _status_json(st: Any) -> dict[str, Any]:
    return {"enabled": st.enabled, "pending": st.pending, "recoveryCodesLeft": st.recovery_codes_left,
            "enabledAt": st.enabled_at.isoformat() if st.enabled_at else None}


async def show(request: web.Request) -> web.Response:
    account, _, _ = await routes._account_of(request)
    body = _status_json(await _tf(request).status(account.id))
    return plex.respond(request, xml=plex.element("twoFactor", body), json=body)


# --------------------------------------------------------------------------------- internal


async def internal_status(request: web.Request) -> web.Response:
    internal_only(request)
    account_id = routes.path_account_id(request)
    return web.json_response(_status_json(await _tf(request).status(account_id)))


async def _session(request: web.Request, account: store.Account, remember: bool) -> web.Response:
    token = await routes._mint(request, account, remember)
    return web.json_response({"authToken": token, "accountId": str(account.id)})


async def internal_signin(request: web.Request) -> web.Response:
    """The web's password step: a session, or a pending sign-in waiting for its second factor."""
    internal_only(request)
    body = await json_object(request)
    if not await plex.param(request, "X-Plex-Client-Identifier"):
        raise MissingClientIdentifier()
    login, password = body.get("login"), body.get("password")
    remember = bool(body.get("rememberMe", True))
    auth = request.app[routes.AUTH]
    try:
        account = await auth.authenticate(str(login) if login else None, str(password) if password else None,
                                          client_address(request))
    except TwoFactorRequired:
        # The password was right (authenticate checks the code only after it): remember that, briefly.
        found = await store.find_by_login(auth.pool, _norm(str(login)))
        if found is None:
            raise
        pending = await auth.two_factor.start_pending(found.id, remember)
        return web.json_response({"secondFactorRequired": True, "pending": pending})
    return await _session(request, account, remember)


def _norm(login: str) -> str:
    from services.auth.service import normalise_login

    return normalise_login(login)


async def internal_second_factor(request: web.Request) -> web.Response:
    internal_only(request)
    body = await json_object(request)
    if not await plex.param(request, "X-Plex-Client-Identifier"):
        raise MissingClientIdentifier()
    pending, code = body.get("pending"), body.get("code")

    async def mint(account: store.Account, remember: bool) -> web.Response:
        if account.reset_required_at is not None:
            from services.auth.errors import ResetRequired

            raise ResetRequired()
        return await _session(request, account, remember)

    return await _tf(request).finish_pending(str(pending) if pending else None, str(code) if code else None, mint)


def setup(app: web.Application) -> None:
    r = app.router
    for suffix in ("", ".json", ".xml"):
        r.add_post(f"/api/v2/user/two-factor{suffix}", start)
        r.add_put(f"/api/v2/user/two-factor{suffix}", confirm)
        r.add_delete(f"/api/v2/user/two-factor{suffix}", disable)
        r.add_get(f"/api/v2/user/two-factor{suffix}", show)
        r.add_post(f"/api/v2/user/two-factor/recovery-codes{suffix}", regenerate)
    r.add_get("/internal/accounts/{account_id}/two-factor", internal_status)
    r.add_post("/internal/signin", internal_signin)
    r.add_post("/internal/signin/second-factor", internal_second_factor)
