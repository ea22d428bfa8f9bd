"""notification's domain logic, the mapping: which event becomes which email.

Each function takes one typed event (see ``events.py``, which dispatches to them through the
registry) and turns it into ``deliveries`` rows, idempotently on (event id, part), in the consumer's
transaction with its processed-event marker; the recipients projection (email and username per
account) is kept up to date on the way. Rendering is in ``rendering.py``, sending in ``delivery.py``.

Exactly once in effect:
- The consumer only writes rows; then the offset is committed. The sender claims due rows (status
  ``sending``), sends, and marks them ``sent``. A redelivered event therefore never sends again, and
  a notification process that is down loses nothing: the consumer resumes from committed offsets and
  the sender from the table.
- The one window SMTP itself leaves open: if the process dies after the SMTP server accepted a
  message and before the row is marked ``sent``, the row returns to the queue after
  ``SENDING_TIMEOUT`` and the message is sent again. Its ``Message-ID`` is derived from the event
  id and part, so the duplicate is recognisable (and deduplicated by many mail systems).

Priorities: password resets 0, other notices 5, breach notices 9 (a mass mailing never delays a
reset someone is waiting for).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from services.notification import store
from shared.events import (
    AccountCreated,
    AccountResetRequired,
    AccountsResetRequired,
    DeviceCodeApproved,
    Envelope,
    PasswordChanged,
    PasswordResetRequested,
    PinLinked,
    ServerClaimed,
    TwoFactorDisabled,
    TwoFactorEnabled,
    TwoFactorRecoveryCodeUsed,
)

PRIORITY = {"password_reset": 0, "password_changed": 5, "device_linked": 5, "server_claimed": 5,
            "reset_required": 9, "two_factor_enabled": 5, "two_factor_disabled": 5, "recovery_code_used": 5}


async def _one(conn: asyncpg.Connection, env: Envelope, kind: str, account: str, email: str | None,
               context: dict[str, Any], incident_id: str | None = None) -> None:
    await store.insert_deliveries(conn, env.id, kind, PRIORITY[kind], [(UUID(account), email, context)],
                                  incident_id=incident_id)


async def account_created(conn: asyncpg.Connection, ev: AccountCreated, env: Envelope) -> None:
    await store.upsert_recipient(conn, UUID(ev.account_id), ev.email, ev.username)


async def reset_requested(conn: asyncpg.Connection, ev: PasswordResetRequested, env: Envelope) -> None:
    await store.upsert_recipient(conn, UUID(ev.account_id), ev.email, ev.username)
    await _one(conn, env, "password_reset", ev.account_id, ev.email, {
        "username": ev.username, "sealed_token": ev.sealed_token, "reset_url": ev.reset_url,
        "expires_at": ev.expires_at})


async def password_changed(conn: asyncpg.Connection, ev: PasswordChanged, env: Envelope) -> None:
    await store.upsert_recipient(conn, UUID(ev.account_id), ev.email, ev.username)
    if ev.notify:
        await _one(conn, env, "password_changed", ev.account_id, ev.email, {
            "username": ev.username, "cause": ev.cause, "signed_out": ev.revoke_sessions,
            "changed_at": ev.changed_at or env.occurred_at.isoformat()})


async def reset_required(conn: asyncpg.Connection, ev: AccountResetRequired, env: Envelope) -> None:
    if ev.notify:
        await _one(conn, env, "reset_required", ev.account_id, ev.email, {
            "username": ev.username, "reason": ev.reason, "sealed_token": ev.sealed_token,
            "reset_url": ev.reset_url, "expires_at": ev.expires_at}, incident_id=ev.incident_id)


async def resets_required(conn: asyncpg.Connection, ev: AccountsResetRequired, env: Envelope) -> None:
    """The breach command's batch: one delivery per account (part = its position in the batch)."""
    if ev.notify:
        items = [(UUID(a["account_id"]), str(a["email"]),
                  {"username": a["username"], "reason": ev.reason, "sealed_token": a.get("sealed_token"),
                   "reset_url": ev.reset_url, "expires_at": ev.expires_at}) for a in ev.accounts]
        await store.insert_deliveries(conn, env.id, "reset_required", PRIORITY["reset_required"], items,
                                      incident_id=ev.incident_id)


async def pin_linked(conn: asyncpg.Connection, ev: PinLinked, env: Envelope) -> None:
    device = " ".join(x for x in (ev.product, ev.device_name) if x) + (f" ({ev.platform})" if ev.platform else "")
    await _one(conn, env, "device_linked", ev.account_id, None, {"device": device or "A device",
                                                                "when": ev.linked_at})


async def device_code_approved(conn: asyncpg.Connection, ev: DeviceCodeApproved, env: Envelope) -> None:
    await _one(conn, env, "device_linked", ev.account_id, None, {"device": ev.device_name or ev.client_id or
                                                                "A device", "when": ev.approved_at})


async def server_claimed(conn: asyncpg.Connection, ev: ServerClaimed, env: Envelope) -> None:
    name = ev.name + (f" ({ev.platform})" if ev.platform else "")
    await _one(conn, env, "server_claimed", ev.account_id, None, {"device": name or ev.client_identifier,
                                                                 "when": ev.claimed_at})


async def _two_factor_notice(conn: asyncpg.Connection, env: Envelope, kind: str, account: str, email: str,
                             username: str, context: dict[str, Any]) -> None:
    await store.upsert_recipient(conn, UUID(account), email, username)
    await _one(conn, env, kind, account, email, {"username": username, **context})


async def two_factor_enabled(conn: asyncpg.Connection, ev: TwoFactorEnabled, env: Envelope) -> None:
    await _two_factor_notice(conn, env, "two_factor_enabled", ev.account_id, ev.email, ev.username,
                             {"when": ev.enabled_at})


async def two_factor_disabled(conn: asyncpg.Connection, ev: TwoFactorDisabled, env: Envelope) -> None:
    await _two_factor_notice(conn, env, "two_factor_disabled", ev.account_id, ev.email, ev.username,
                             {"when": ev.disabled_at, "by": ev.by, "reason": ev.reason or ""})


async def recovery_code_used(conn: asyncpg.Connection, ev: TwoFactorRecoveryCodeUsed, env: Envelope) -> None:
    await _two_factor_notice(conn, env, "recovery_code_used", ev.account_id, ev.email, ev.username,
                             {"when": ev.used_at, "codes_left": ev.codes_left})
