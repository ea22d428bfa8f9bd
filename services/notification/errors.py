"""notification's error types."""

from __future__ import annotations


class InvalidSmtpUrl(ValueError):
    """``SMTP_URL`` is not ``smtp://[user:pass@]host:port[?starttls=1]`` or ``smtps://...``."""
