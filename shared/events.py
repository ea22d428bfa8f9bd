"""The event envelope, the registry of event types, and the topic names.

Every event on Kafka is one JSON envelope (orjson): ``id`` (UUID, unique forever), ``type`` (past
tense), ``occurred_at`` (RFC 3339 UTC), ``producer``, ``key`` (also the Kafka record key, so events of
one key stay in order on one partition), ``data`` and ``trace`` (W3C trace context, optional).

The key is the account id for every event about one account. Batch events have no single account:
``accounts.reset_required`` and ``passwords.changed`` (the breach command) are keyed by the incident
id, a bulk ``sessions.revoked`` by whatever key its caller gave (the incident id for a breach),
``revocation.applied`` by the revocation id, and ``notification.dead_lettered`` by the account id, or
the event id when the delivery had no account. Kafka headers repeat ``event_type``, ``event_id`` and ``content-type`` so
consumers can route without decoding.

Event payloads are frozen dataclasses with a ``TYPE``; :func:`decode_data` turns an envelope's
``data`` back into the dataclass. Changes are additive: new optional fields only; a breaking change
gets a new type name (``...v2``).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import orjson

from shared import logs

# Topic names, before the configured prefix.
AUTH_EVENTS = "auth.events"
DEVICESESSION_EVENTS = "devicesession.events"
LINKCODE_EVENTS = "linkcode.events"
SESSIONS_REVOKED = "sessions.revoked"
REVOCATIONS_APPLIED = "revocations.applied"
NOTIFICATION_DEAD_LETTERS = "notification.dead-letters"
ALL_TOPICS = (
    AUTH_EVENTS,
    DEVICESESSION_EVENTS,
    LINKCODE_EVENTS,
    SESSIONS_REVOKED,
    REVOCATIONS_APPLIED,
    NOTIFICATION_DEAD_LETTERS,
)


def dead_letter_topic(group: str) -> str:
    """Each consumer group has its own dead-letter topic (already prefixed groups stay so)."""
    return f"{group}.dlq"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Envelope:
    id: uuid.UUID
    type: str
    occurred_at: datetime
    producer: str
    key: str
    data: dict[str, Any]
    trace: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "id": str(self.id),
                "type": self.type,
                "occurred_at": iso(self.occurred_at),
                "producer": self.producer,
                "key": self.key,
                "data": self.data,
                "trace": self.trace,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        """Parse an envelope; raises ``ValueError`` on anything malformed."""
        try:
            obj = orjson.loads(raw)
            return cls(
                id=uuid.UUID(obj["id"]),
                type=str(obj["type"]),
                occurred_at=parse_time(obj["occurred_at"]),
                producer=str(obj["producer"]),
                key=str(obj["key"]),
                data=dict(obj["data"]),
                trace=dict(obj.get("trace") or {}),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed event envelope: {exc}") from exc

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("event_type", self.type.encode()),
            ("event_id", str(self.id).encode()),
            ("content-type", b"application/json"),
        ]


class Event:
    """Base of event payload dataclasses."""

    TYPE: ClassVar[str]


E = TypeVar("E", bound=Event)
REGISTRY: dict[str, type[Event]] = {}


def register(cls: type[E]) -> type[E]:
    REGISTRY[cls.TYPE] = cls
    return cls


def envelope(event: Event, *, producer: str, key: str, trace: dict[str, str] | None = None) -> Envelope:
    data = {f.name: _jsonable(getattr(event, f.name)) for f in dataclasses.fields(event)}  # type: ignore[arg-type]
    return Envelope(
        id=uuid.uuid4(),
        type=event.TYPE,
        occurred_at=utcnow(),
        producer=producer,
        key=key,
        data=data,
        trace=trace if trace is not None else logs.trace_context(),
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def decode_data(env: Envelope, cls: type[E]) -> E:
    """Build the typed payload, ignoring unknown (newer, additive) fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in env.data.items() if k in names})


# ---------------------------------------------------------------------------------------------
# auth.events
# ---------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class AccountCreated(Event):
    TYPE: ClassVar[str] = "account.created"
    account_id: str
    email: str
    username: str


@register
@dataclass(frozen=True)
class PasswordChanged(Event):
    """Starts the revocation chain. ``cause`` is ``reset``, ``change`` or ``forced``."""

    TYPE: ClassVar[str] = "password.changed"
    account_id: str
    email: str
    username: str
    cause: str
    revoke_sessions: bool
    keep_session_id: str | None = None
    changed_at: str | None = None
    incident_id: str | None = None
    # Plain-language reason, shown in emails (forced resets)
    reason: str | None = None
    # Whether notification should email "your password was changed" (not for forced resets,
    # which get the breach notice instead).
    notify: bool = True


@register
@dataclass(frozen=True)
class PasswordResetRequested(Event):
    """``sealed_token`` is the reset token sealed for notification (see shared.crypto)."""

    TYPE: ClassVar[str] = "password.reset_requested"
    account_id: str
    email: str
    username: str
    sealed_token: str
    reset_url: str
    expires_at: str


@register
@dataclass(frozen=True)
class AccountResetRequired(Event):
    """An account was flagged as requiring a password reset (breach response or admin)."""

    TYPE: ClassVar[str] = "account.reset_required"
    account_id: str
    email: str
    username: str
    reason: str
    incident_id: str | None = None
    notify: bool = False
    sealed_token: str | None = None
    reset_url: str | None = None
    expires_at: str | None = None


@register
@dataclass(frozen=True)
class AccountsResetRequired(Event):
    """Batch form of ``account.reset_required`` written by the breach command (one event per batch
    of accounts, key = incident id). ``accounts`` holds mappings with ``account_id``, ``email``,
    ``username`` and ``sealed_token`` (sealed with context = its account id, or null)."""

    TYPE: ClassVar[str] = "accounts.reset_required"
    incident_id: str
    batch: int
    reason: str
    notify: bool
    accounts: list[dict[str, Any]]
    reset_url: str | None = None
    expires_at: str | None = None


@register
@dataclass(frozen=True)
class PasswordsChanged(Event):
    """Batch form of ``password.changed`` for forced resets (cause ``forced``): devicesession revokes
    every session of every listed account in one statement and publishes one ``sessions.revoked``
    naming them in ``account_ids`` (key = incident id)."""

    TYPE: ClassVar[str] = "passwords.changed"
    incident_id: str
    batch: int
    account_ids: list[str]
    cause: str = "forced"
    revoke_sessions: bool = True
    reason: str | None = None
    changed_at: str | None = None


@register
@dataclass(frozen=True)
class TwoFactorEnabled(Event):
    """Two-step verification was turned on (the person confirmed a code)."""

    TYPE: ClassVar[str] = "two_factor.enabled"
    account_id: str
    email: str
    username: str
    enabled_at: str


@register
@dataclass(frozen=True)
class TwoFactorDisabled(Event):
    """Two-step verification was turned off: ``by`` is ``user`` or ``admin`` (with ``reason``)."""

    TYPE: ClassVar[str] = "two_factor.disabled"
    account_id: str
    email: str
    username: str
    by: str
    disabled_at: str
    reason: str | None = None


@register
@dataclass(frozen=True)
class TwoFactorRecoveryCodeUsed(Event):
    """A recovery code was redeemed at sign-in; ``codes_left`` unused codes remain."""

    TYPE: ClassVar[str] = "two_factor.recovery_code_used"
    account_id: str
    email: str
    username: str
    codes_left: int
    used_at: str


# ---------------------------------------------------------------------------------------------
# sessions.revoked / revocations.applied / devicesession.events
# ---------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class SessionsRevoked(Event):
    """Fan-out: every instance of every session holder reads this and evicts what it covers.

    ``session_ids`` lists the sessions revoked; ``all_sessions`` means every session of the account
    issued before ``cutoff`` (used when the list would be too long to carry).
    """

    TYPE: ClassVar[str] = "sessions.revoked"
    revocation_id: str
    account_id: str
    session_ids: list[str]
    cutoff: str
    cause: str
    causing_event_id: str | None = None
    all_sessions: bool = False
    # Bulk revocations (forced resets): every session of each of these accounts issued before
    # ``cutoff`` is revoked; holders evict by account. ``account_id`` is then the incident id.
    account_ids: list[str] | None = None


@register
@dataclass(frozen=True)
class RevocationApplied(Event):
    TYPE: ClassVar[str] = "revocation.applied"
    holder_id: str
    revocation_id: str
    applied_at: str
    revoked_at: str | None = None
    evicted: int = 0
    # Which instance (process, pod) of the holder applied it; empty from kits older than issue 17.
    instance_id: str = ""


@register
@dataclass(frozen=True)
class DeviceRemoved(Event):
    TYPE: ClassVar[str] = "device.removed"
    account_id: str
    device_id: str
    client_identifier: str
    name: str


# ---------------------------------------------------------------------------------------------
# linkcode.events
# ---------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class PinLinked(Event):
    TYPE: ClassVar[str] = "pin.linked"
    account_id: str
    device_id: str
    client_identifier: str
    product: str
    device_name: str
    platform: str
    linked_at: str


@register
@dataclass(frozen=True)
class DeviceCodeApproved(Event):
    TYPE: ClassVar[str] = "device_code.approved"
    account_id: str
    client_id: str
    device_name: str
    approved_at: str


@register
@dataclass(frozen=True)
class ServerClaimed(Event):
    TYPE: ClassVar[str] = "server.claimed"
    account_id: str
    device_id: str
    client_identifier: str
    name: str
    platform: str
    claimed_at: str
