"""linkcode's error types. OAuth errors (RFC 8628 section 3.5) render as ``{"error": code}`` on
``/oauth/*``; Plex routes render Plex's shape (1020 for unknown, expired and used codes alike)."""

from __future__ import annotations

from shared.errors import HearthError, NotFound, Throttled


class CodeNotFound(NotFound):
    code = "code_not_found"
    title = "Code not found or expired"
    plex_code = 1020


class CodeBudgetExhausted(Throttled):
    code = "too_many_wrong_codes"
    title = "Too many wrong codes; try again later"
    plex_code = 1120


class CreationThrottled(Throttled):
    code = "too_many_codes_requested"
    title = "Too many codes requested; try again later"
    plex_code = 1121


class CodeSpaceFull(HearthError):
    status = 503
    code = "code_space_full"
    title = "Every link code is in use right now; try again in a few minutes"
    plex_code = 1122


class InvalidClaim(HearthError):
    status = 400
    code = "invalid_claim_token"
    title = "The claim token is invalid, expired or already used; get a new one"
    plex_code = 1123


class AuthorizationPending(HearthError):
    status = 400
    code = "authorization_pending"
    title = "The user has not approved this code yet"


class SlowDown(HearthError):
    status = 400
    code = "slow_down"
    title = "Polling too fast"


class AccessDenied(HearthError):
    status = 400
    code = "access_denied"
    title = "The user denied the request"


class ExpiredToken(HearthError):
    status = 400
    code = "expired_token"
    title = "The device code has expired"


class InvalidGrant(HearthError):
    status = 400
    code = "invalid_grant"
    title = "The device code is invalid or was already used"


class UnsupportedGrant(HearthError):
    status = 400
    code = "unsupported_grant_type"
    title = "Only the device_code grant is supported here"


class ClientMismatch(HearthError):
    """The auth app's ``clientID`` is not the client that created the PIN (a link built for one app,
    opened with another's code): nothing is linked."""

    status = 409
    code = "client_mismatch"
    title = "This sign-in request does not belong to the app that sent you here"
    plex_code = 1124
