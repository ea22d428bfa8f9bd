"""Settings of the notification service (see README.md, Configuration)."""

from __future__ import annotations

from shared.settings import CommonSettings


class Settings(CommonSettings):
    service_name: str = "notification"
