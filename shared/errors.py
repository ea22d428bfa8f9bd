"""One error type for every service, rendered by one middleware.

A :class:`HearthError` carries an HTTP ``status``, a stable snake_case ``code``, a human ``title``
and, for Plex routes, a numeric ``plex_code``. The error middleware (``shared.app``) renders it in
the shape of the route family: Plex ``errors`` (XML or JSON) on Plex routes, OAuth error JSON on
``/oauth/*``, RFC 9457 problem JSON elsewhere. Handlers raise; they never build error responses.

Plex codes Hearth defines beyond Plex's own (1000, 1001, 1020, 1029) are listed in README.md.
"""

from __future__ import annotations

from typing import Any


class HearthError(Exception):
    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"
    plex_code: int = 1099

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
        plex_code: int | None = None,
        retry_after: int | None = None,
        field: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.detail = detail or self.title
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if plex_code is not None:
            self.plex_code = plex_code
        self.retry_after = retry_after
        self.field = field
        self.extra = extra or {}
        super().__init__(self.detail)


class ValidationFailed(HearthError):
    status = 400
    code = "invalid_request"
    title = "The request is not valid"
    plex_code = 1098


class PayloadTooLarge(HearthError):
    status = 413
    code = "payload_too_large"
    title = "The request body is too large"
    plex_code = 1097


class Unauthorized(HearthError):
    status = 401
    code = "unauthorized"
    title = "User could not be authenticated"
    plex_code = 1001


class InvalidToken(Unauthorized):
    code = "invalid_token"
    title = "Invalid token"
    plex_code = 1001


class Forbidden(HearthError):
    status = 403
    code = "forbidden"
    title = "Not allowed"
    plex_code = 1003


class NotFound(HearthError):
    status = 404
    code = "not_found"
    title = "Not found"
    plex_code = 1020


class Conflict(HearthError):
    status = 409
    code = "conflict"
    title = "Conflict"
    plex_code = 1096


class Throttled(HearthError):
    status = 429
    code = "too_many_requests"
    title = "Too many attempts; try again later"
    plex_code = 1095


class MissingClientIdentifier(HearthError):
    status = 400
    code = "missing_client_identifier"
    title = "X-Plex-Client-Identifier is missing"
    plex_code = 1000


class Unavailable(HearthError):
    status = 503
    code = "unavailable"
    title = "A dependency is unavailable; try again"
    plex_code = 1094
