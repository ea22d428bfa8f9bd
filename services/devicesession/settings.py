"""Settings of the devicesession service (see README.md, Configuration)."""

from __future__ import annotations

from shared.settings import CommonSettings


class Settings(CommonSettings):
    service_name: str = "devicesession"
    # Sessions minted with rememberMe=false expire after this many seconds; others do not expire.
    short_session_ttl: int = 24 * 3600
    # How often batched last-used / last-seen times are written (introspection never writes inline).
    touch_interval: float = 30.0
