"""Settings of the devicesession service (see README.md, Configuration)."""

from __future__ import annotations

from shared.settings import CommonSettings


class Settings(CommonSettings):
    service_name: str = "devicesession"
    # Sessions minted with rememberMe=false expire after this many seconds; others do not expire.
    short_session_ttl: int = 24 * 3600
    # How often batched last-used / last-seen times are written (introspection never writes inline).
    touch_interval: float = 30.0
    # Read-your-writes for sign-outs: a sign-out, device removal or "sign out others" answers only once
    # every instance of these holders (Hearth's own services that cache sessions) that may hold a
    # cached token has applied the revocation, or after applied_wait seconds at most.
    applied_wait: float = 2.0
    applied_wait_holders: str = "auth,linkcode,web"
    # How long a holder instance may answer from its cache after it last asked about an active
    # token: the kit's CACHE_TTL plus the granularity of recording introspections.
    applied_wait_window: float = 45.0

    def wait_holders(self) -> frozenset[str]:
        return frozenset(h.strip() for h in self.applied_wait_holders.split(",") if h.strip())
