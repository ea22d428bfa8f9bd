"""The one way a Hearth service turns a request's ``X-Plex-Token`` into a principal.

The token is read like every Plex value (header, then query, then form) and validated through the
service's own holder kit (``app[HOLDER]``): from its cache when the revocation consumer vouches for
it, else by introspection. No token, or one that is not valid: 401 with Plex code 1001. web's
browser session is the same check on the session cookie (``services/web/routes.current``).
"""

from __future__ import annotations

from aiohttp import web

from shared import plex
from shared.errors import InvalidToken
from shared.holder import HOLDER, Principal


async def token_principal(request: web.Request) -> tuple[Principal, str]:
    """(principal, token) of the request's X-Plex-Token, or InvalidToken."""
    token = await plex.param(request, "X-Plex-Token")
    principal = await request.app[HOLDER].validate(token) if token else None
    if principal is None or token is None:
        raise InvalidToken()
    return principal, token
