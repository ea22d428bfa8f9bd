"""Settings of the web service (see README.md, Configuration)."""

from __future__ import annotations

from pydantic import SecretStr

from shared.settings import CommonSettings


class Settings(CommonSettings):
    service_name: str = "web"
    # Key of the CSRF tokens (HMAC of the per-browser CSRF cookie).
    csrf_secret: SecretStr
    # Browser sessions are remembered this long (seconds) by the cookie.
    session_cookie_max_age: int = 30 * 24 * 3600
    claim_ttl: int = 240
