"""Settings of the linkcode service (see README.md, Configuration)."""

from __future__ import annotations

from pydantic import SecretStr

from shared.settings import CommonSettings


class Settings(CommonSettings):
    service_name: str = "linkcode"
    # Seals session tokens that wait to be collected (id:base64key,...; linkcode's own key).
    linkcode_seal_keys: SecretStr
    pin_ttl: int = 900
    strong_code_length: int = 25
    device_code_ttl: int = 900
    device_code_interval: int = 5
    claim_ttl: int = 240
    # Wrong code entries allowed per account per window (RFC 8628 section 5.1), then refused.
    code_attempts: int = 5
    code_attempt_window: int = 900
    # Wrong code entries allowed per client address per window: more accounts buy no more guesses.
    code_attempts_per_address: int = 20
    # PIN / device code creation limits per address and per client, per window.
    create_per_address: int = 60
    create_per_client: int = 20
    create_window: int = 600
    cleanup_interval: float = 60.0
