"""Settings read once from the environment, frozen, validated at start.

Every variable is documented in README.md ("Configuration"). Secrets are ``SecretStr`` so they
never print. A service builds its settings in ``__main__`` with :func:`load`, which exits with the
list of what is missing or malformed instead of a traceback.
"""

from __future__ import annotations

import base64
import sys
from typing import Any, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="CommonSettings")


def decode_key(value: str, *, min_bytes: int = 32) -> bytes:
    """Decode a urlsafe-base64 key (padding optional) and check its length."""
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    if len(raw) < min_bytes:
        raise ValueError(f"key must decode to at least {min_bytes} bytes")
    return raw


class CommonSettings(BaseSettings):
    """What every service reads. Subclasses add their own fields."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    service_name: str = "hearth"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    log_level: str = "INFO"
    # A server URL (any database name); each service uses its own database on it, named
    # hearth_<service>, unless <SERVICE>_DATABASE_URL names one explicitly.
    database_url: str = Field(default="postgresql://127.0.0.1:5432/postgres")
    service_database_url: str | None = None
    # Prefix of per-service database names (test runs sharing one server use their own).
    db_name_prefix: str = ""
    db_pool_min: int = 1
    db_pool_max: int = 10
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # Prepended to every topic and consumer group: lets test runs share one broker.
    topic_prefix: str = ""
    topic_partitions: int = 4
    # Housekeeping (issue 17), run by the replica that holds the outbox relay lock: published outbox
    # rows are kept a day; processed-event markers 8 days, longer than the topics' retention (7 days
    # by Kafka's default, 24 h on the development brokers), so a redelivery is still recognised.
    outbox_retention: float = 86400.0
    processed_events_retention: float = 8 * 86400.0
    client_max_size: int = 64 * 1024
    # Shared secret of internal callers (service to service), sent as a Bearer token.
    internal_api_secret: SecretStr
    # HMAC key for tokens and one-time codes at rest (urlsafe base64, >= 32 bytes).
    token_hmac_key: SecretStr
    # Master secret from which each holder's introspection credential is derived (shared.holder).
    holder_secret: SecretStr
    public_base_url: str = "http://127.0.0.1:8080"
    devicesession_url: str = "http://127.0.0.1:8102"
    auth_url: str = "http://127.0.0.1:8101"
    linkcode_url: str = "http://127.0.0.1:8103"
    outbox_poll_interval: float = 1.0

    @field_validator("token_hmac_key")
    @classmethod
    def _check_key(cls, v: SecretStr) -> SecretStr:
        decode_key(v.get_secret_value())
        return v

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def db_url(self) -> str:
        """The service's own database: explicit, else ``hearth_<service>`` on DATABASE_URL's server."""
        if self.service_database_url:
            return self.service_database_url
        return with_database(self.database_url, f"{self.db_name_prefix}hearth_{self.service_name}")

    def hmac_key(self) -> bytes:
        return decode_key(self.token_hmac_key.get_secret_value())


def with_database(url: str, dbname: str) -> str:
    """Replace the database name of a postgresql:// URL, keeping host, credentials and query."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def load(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment; on error print what is wrong and exit 2."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]).upper()
            lines.append(f"  {name}: {err['msg']}")
        sys.stderr.write(f"{cls.__name__}: invalid configuration\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
