"""Settings of the notification service (see README.md, Configuration)."""

from __future__ import annotations

from pydantic import SecretStr

from shared.settings import CommonSettings


class Settings(CommonSettings):
    service_name: str = "notification"
    # smtp://[user:pass@]host:port[?starttls=1]  or  smtps://... (implicit TLS)
    smtp_url: SecretStr = SecretStr("smtp://127.0.0.1:1025")
    smtp_timeout: float = 10.0
    # Parallel SMTP connections (each reused for many messages) and messages per second overall.
    smtp_concurrency: int = 4
    smtp_rate: float = 50.0
    # Keys that open tokens sealed by auth (the same SEAL_KEYS).
    seal_keys: SecretStr
    mail_from: str = "Hearth <no-reply@hearth.invalid>"
    product_name: str = "Hearth"
    # Directory of templates that override the built-in ones (same file names).
    template_dir: str | None = None
    max_attempts: int = 10
    permanent_attempts: int = 3
    retry_base: float = 1.0
    retry_max: float = 300.0
    # A row left in 'sending' longer than this (a crash mid-send) is sent again.
    sending_timeout: float = 60.0
