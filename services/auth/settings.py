"""Settings of the auth service (see README.md, Configuration)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from shared.settings import CommonSettings


class Settings(CommonSettings):
    service_name: str = "auth"
    # Sealing keys for secrets that notification must read (id:base64key,...; first one seals).
    seal_keys: SecretStr
    # Optional pepper keys (id:base64key,...; first one is current). Empty: no pepper.
    password_peppers: SecretStr = SecretStr("")
    # argon2id cost; the default is OWASP's minimum for argon2id (19 MiB, 2 passes, parallelism 1).
    argon2_memory_kib: int = 19 * 1024
    argon2_time_cost: int = 2
    argon2_parallelism: int = 1
    # Hashes computed at once (threads); each holds ARGON2_MEMORY_KIB while it runs. 0: one per CPU
    # this process may use (affinity and cgroup CPU limit), at most 8 and within a quarter of a
    # cgroup memory limit (shared.passwords.auto_concurrency). Replicas sharing one machine's cores
    # should split them (the launcher's cluster topology does).
    argon2_concurrency: int = Field(default=0, ge=0, le=256)
    # How far below normal priority the hashing threads run (nice increment, Linux): request handling
    # preempts hashing at once; hashing still gets every otherwise idle cycle. 0 disables.
    argon2_nice: int = Field(default=10, ge=0, le=19)
    # Sign-in mints: while other sign-ins are still hashing, hold a finished sign-in's session mint
    # up to this long so that mints close together go to devicesession as one call. 0 disables;
    # unset, about three hashes' worth of this process's throughput (minting.auto_window).
    mint_batch_window_ms: float | None = Field(default=None, ge=0, le=200)
    reset_token_ttl: int = 3600
    # How long a password change with sign-out waits for devicesession to confirm the revocation
    # before answering (seconds); the answer carries X-Hearth-Sessions-Revoked when confirmed.
    revocation_wait: float = 2.0
    # Sign-in throttling: free failures per window, then blocked for 2^(n - free) seconds (capped).
    signin_free_failures_per_login: int = 5
    signin_free_failures_per_address: int = 20
    signin_window: int = 900
    signin_max_block: int = 900
    # Reset requests: per address and per email address, per window.
    reset_requests_per_address: int = 10
    reset_requests_per_email: int = 3
    reset_window: int = 3600
    # Reset emails sent per account per RESET_WINDOW, whichever login form or address asked.
    reset_emails_per_account: int = 3
    # Sign-ups per client address per window (each new account is a new code-guessing budget).
    signups_per_address: int = 20
    signup_window: int = 3600
    # Two-step verification (issue 20). Keys sealing TOTP secrets at rest (id:base64key,...; the first
    # seals, all open, so keys rotate).
    two_factor_seal_keys: SecretStr
    # An enrollment started and never confirmed expires after this many seconds.
    two_factor_enroll_ttl: int = Field(default=600, ge=60, le=86400)
    # Code attempts per account per window before blocks of 2^n seconds (capped at SIGNIN_MAX_BLOCK).
    two_factor_free_failures: int = Field(default=5, ge=1)
    two_factor_window: int = Field(default=900, ge=1)
    # The web's second sign-in step: how long the password stays proven while the code is asked.
    pending_signin_ttl: int = Field(default=300, ge=30, le=3600)
    # WebAuthn (passkeys): challenge lifetime; the relying party id and origin come from PUBLIC_BASE_URL.
    passkey_challenge_ttl: int = Field(default=300, ge=30, le=3600)
