"""Passkeys (WebAuthn) with the ``webauthn`` library: registration, discoverable sign-in, removal.

The relying-party id is PUBLIC_BASE_URL's host name and the expected origin its scheme://host[:port]
(WebAuthn needs a domain: an IP address such as 127.0.0.1 is not a valid RP id, so a development edge
used with passkeys is reached as http://localhost:PORT). Challenges are random 32 bytes, stored as
HMACs in ``webauthn_challenges`` with their purpose (and, for registration, the account) and an
expiry; redeeming one is a DELETE ... RETURNING, so each is used at most once by any replica.

Sign-in uses discoverable credentials (resident keys): the options name no credential and nobody
types a username; the authenticator picks the credential and returns its user handle, which must be
the account's. User verification is required, so a passkey is a full sign-in by itself: the answer
is a session minted by devicesession like a password sign-in's (``sessions.revoked`` ends it).

Internal routes (web): ``POST /internal/accounts/{id}/passkeys/options``, ``POST
/internal/accounts/{id}/passkeys``, ``GET /internal/accounts/{id}/passkeys``, ``DELETE
/internal/accounts/{id}/passkeys/{passkey_id}``, ``POST /internal/passkeys/options``,
``POST /internal/passkeys/signin``.
"""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url, parse_client_data_json
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, InvalidRegistrationResponse
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from services.auth import routes, store
from services.auth.errors import ResetRequired
from shared import tokens
from shared.app import internal_only, json_object
from shared.errors import NotFound, Unauthorized, ValidationFailed
from shared.settings import CommonSettings


class PasskeyRejected(ValidationFailed):
    code = "passkey_rejected"
    title = "The passkey could not be verified; try again"
    plex_code = 1126


class PasskeySigninFailed(Unauthorized):
    code = "passkey_signin_failed"
    title = "That passkey is not known here, or the sign-in expired; try again"
    plex_code = 1001


def relying_party(settings: CommonSettings) -> tuple[str, str]:
    """(RP id, origin) from PUBLIC_BASE_URL."""
    parts = urlsplit(settings.public_base_url)
    return parts.hostname or "localhost", f"{parts.scheme}://{parts.netloc}"


async def _store_challenge(request: web.Request, challenge: bytes, purpose: str, account_id: uuid.UUID | None) -> None:
    auth = request.app[routes.AUTH]
    await auth.pool.execute(
        "INSERT INTO webauthn_challenges (challenge_hmac, purpose, account_id, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        tokens.digest(auth.key, bytes_to_base64url(challenge), purpose="webauthn"), purpose, account_id,
        float(routes._settings(request).passkey_challenge_ttl))


async def _redeem_challenge(request: web.Request, credential: dict[str, Any], purpose: str,
                            account_id: uuid.UUID | None) -> bytes | None:
    """The challenge the client signed, if it is ours, unexpired, of this purpose, and not used."""
    try:
        response = credential["response"]
        client_data = parse_client_data_json(base64url_to_bytes(str(response["clientDataJSON"])))
    except (KeyError, TypeError, ValueError, Exception):  # noqa: BLE001 - any malformed input is a 4xx
        return None
    challenge = client_data.challenge
    auth = request.app[routes.AUTH]
    found = await auth.pool.fetchval(
        "DELETE FROM webauthn_challenges WHERE challenge_hmac = $1 AND purpose = $2"
        " AND account_id IS NOT DISTINCT FROM $3 AND expires_at > now() RETURNING 1",
        tokens.digest(auth.key, bytes_to_base64url(challenge), purpose="webauthn"), purpose, account_id)
    return challenge if found else None


async def _user_handle(request: web.Request, account_id: uuid.UUID) -> bytes:
    pool = request.app[routes.AUTH].pool
    handle: bytes | None = await pool.fetchval(
        "INSERT INTO webauthn_users (account_id, user_handle) VALUES ($1, $2) ON CONFLICT (account_id)"
        " DO UPDATE SET user_handle = webauthn_users.user_handle RETURNING user_handle", account_id, os.urandom(32))
    assert handle is not None
    return handle


def _credential(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("credential")
    if isinstance(raw, str):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise PasskeyRejected("credential must be JSON", field="credential") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("response"), dict):
        raise PasskeyRejected("credential is missing", field="credential")
    return raw


# --------------------------------------------------------------------------------- registration


async def registration_options(request: web.Request) -> web.Response:
    internal_only(request)
    account_id = routes.path_account_id(request)
    pool = request.app[routes.AUTH].pool
    account = await store.find_by_id(pool, account_id)
    if account is None:
        raise NotFound("no such account")
    rp_id, _ = relying_party(routes._settings(request))
    existing = await pool.fetch("SELECT credential_id, transports FROM passkeys WHERE account_id = $1", account_id)
    options = generate_registration_options(
        rp_id=rp_id, rp_name="Hearth", user_name=account.username, user_display_name=account.username,
        user_id=await _user_handle(request, account_id),
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED, user_verification=UserVerificationRequirement.REQUIRED),
        exclude_credentials=[PublicKeyCredentialDescriptor(id=r["credential_id"]) for r in existing],
    )
    await _store_challenge(request, options.challenge, "register", account_id)
    return web.Response(body=options_to_json(options), content_type="application/json")


async def register(request: web.Request) -> web.Response:
    internal_only(request)
    account_id = routes.path_account_id(request)
    body = await json_object(request)
    credential = _credential(body)
    name = str(body.get("name") or "").strip()[:60] or "Passkey"
    challenge = await _redeem_challenge(request, credential, "register", account_id)
    if challenge is None:
        raise PasskeyRejected("this passkey request expired or was already used; try again")
    rp_id, origin = relying_party(routes._settings(request))
    try:
        verified = verify_registration_response(credential=credential, expected_challenge=challenge,
                                                expected_rp_id=rp_id, expected_origin=origin,
                                                require_user_verification=True)
    except (InvalidRegistrationResponse, ValueError, KeyError, TypeError) as exc:
        raise PasskeyRejected(f"the passkey could not be verified: {str(exc)[:120]}") from None
    transports = [str(t) for t in credential.get("response", {}).get("transports", []) or []
                  if str(t) in {x.value for x in AuthenticatorTransport}]
    pool = request.app[routes.AUTH].pool
    row = await pool.fetchrow(
        "INSERT INTO passkeys (credential_id, account_id, public_key, sign_count, name, transports)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (credential_id) DO NOTHING RETURNING id, created_at",
        verified.credential_id, account_id, verified.credential_public_key, verified.sign_count, name, transports)
    if row is None:
        raise PasskeyRejected("this passkey is already registered")
    return web.json_response({"id": row["id"], "name": name, "created_at": row["created_at"].isoformat()},
                             status=201)


async def list_passkeys(request: web.Request) -> web.Response:
    internal_only(request)
    account_id = routes.path_account_id(request)
    rows = await request.app[routes.AUTH].pool.fetch(
        "SELECT id, name, created_at, last_used_at FROM passkeys WHERE account_id = $1 ORDER BY created_at",
        account_id)
    return web.json_response({"passkeys": [
        {"id": r["id"], "name": r["name"], "created_at": r["created_at"].isoformat(),
         "last_used_at": r["last_used_at"].isoformat() if r["last_used_at"] else None} for r in rows]})


async def remove(request: web.Request) -> web.Response:
    internal_only(request)
    account_id = routes.path_account_id(request)
    raw = request.match_info["passkey_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("no such passkey")
    done = await request.app[routes.AUTH].pool.fetchval(
        "DELETE FROM passkeys WHERE id = $1 AND account_id = $2 RETURNING 1", int(raw), account_id)
    if not done:
        raise NotFound("no such passkey")
    return web.Response(status=204)


# --------------------------------------------------------------------------------- sign-in


async def authentication_options(request: web.Request) -> web.Response:
    internal_only(request)
    rp_id, _ = relying_party(routes._settings(request))
    options = generate_authentication_options(rp_id=rp_id, user_verification=UserVerificationRequirement.REQUIRED)
    await _store_challenge(request, options.challenge, "authenticate", None)
    return web.Response(body=options_to_json(options), content_type="application/json")


async def signin(request: web.Request) -> web.Response:
    internal_only(request)
    body = await json_object(request)
    credential = _credential(body)
    challenge = await _redeem_challenge(request, credential, "authenticate", None)
    if challenge is None:
        raise PasskeySigninFailed()
    try:
        credential_id = base64url_to_bytes(str(credential.get("rawId") or credential.get("id")))
    except ValueError:
        raise PasskeySigninFailed() from None
    pool = request.app[routes.AUTH].pool
    row = await pool.fetchrow(
        "SELECT p.id, p.account_id, p.public_key, p.sign_count, u.user_handle FROM passkeys p"
        " JOIN webauthn_users u ON u.account_id = p.account_id WHERE p.credential_id = $1", credential_id)
    if row is None:
        raise PasskeySigninFailed()
    handle = (credential.get("response") or {}).get("userHandle")
    try:
        if handle and not tokens.same(base64url_to_bytes(str(handle)), row["user_handle"]):
            raise PasskeySigninFailed()
    except ValueError:
        raise PasskeySigninFailed() from None
    rp_id, origin = relying_party(routes._settings(request))
    try:
        verified = verify_authentication_response(
            credential=credential, expected_challenge=challenge, expected_rp_id=rp_id, expected_origin=origin,
            credential_public_key=row["public_key"], credential_current_sign_count=row["sign_count"],
            require_user_verification=True)
    except (InvalidAuthenticationResponse, ValueError, KeyError, TypeError):
        raise PasskeySigninFailed() from None
    updated = await pool.fetchval(
        "UPDATE passkeys SET sign_count = $2, last_used_at = now() WHERE id = $1 RETURNING 1",
        row["id"], verified.new_sign_count)
    account = await store.find_by_id(pool, row["account_id"]) if updated else None
    if account is None:
        raise PasskeySigninFailed()  # removed meanwhile
    if account.reset_required_at is not None:
        raise ResetRequired()
    token = await routes._mint(request, account, remember=True)
    return web.json_response({"authToken": token, "accountId": str(account.id)})


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/internal/accounts/{account_id}/passkeys/options", registration_options)
    r.add_post("/internal/accounts/{account_id}/passkeys", register)
    r.add_get("/internal/accounts/{account_id}/passkeys", list_passkeys)
    r.add_delete("/internal/accounts/{account_id}/passkeys/{passkey_id}", remove)
    r.add_post("/internal/passkeys/options", authentication_options)
    r.add_post("/internal/passkeys/signin", signin)
