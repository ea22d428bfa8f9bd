"""devicesession's consumers: it turns password changes into revocations and records holders'
acknowledgements.

- ``auth.events`` / ``password.changed``: when ``revoke_sessions`` is set, revoke every session of
  the account except ``keep_session_id`` in one statement and publish one ``sessions.revoked``.
- ``auth.events`` / ``passwords.changed`` (the breach command's batch form): revoke every session of
  every listed account in one statement; one ``sessions.revoked`` naming the accounts.
- ``revocations.applied``: store each holder instance's acknowledgement (the fan-out view), and
  when each instance was first and last heard of (``holder_instances``; written outside the event's
  transaction, see ``make_ack_handler``).

All run in the ConsumerRunner's transaction with its processed-events marker, and the revocation is
also unique on its causing event id: a redelivered event revokes nothing twice and publishes nothing.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import asyncpg

from services.devicesession import service, store
from shared.dispatch import EventHandlers
from shared.events import (
    AccountCreated,
    AccountResetRequired,
    AccountsResetRequired,
    Envelope,
    PasswordChanged,
    PasswordResetRequested,
    PasswordsChanged,
    RevocationApplied,
    parse_time,
)

ISSUE_MARGIN = timedelta(milliseconds=50)


def _uuid(value: str | None) -> uuid.UUID | None:
    if not value:
        return None
    return uuid.UUID(value)


def make_auth_handler(topics: service.Topics) -> EventHandlers:
    async def on_password_changed(conn: asyncpg.Connection, ev: PasswordChanged, env: Envelope) -> None:
        if ev.revoke_sessions:
            # Sessions signed in after the change (with the new password) are not the change's to revoke,
            # even when its event arrives late (a consumer replica died, a broker failed over). The
            # margin absorbs clock skew between auth's host and the database (NTP keeps it far below).
            await service.revoke_sessions(conn, topics,
                                          service.AccountSessions(uuid.UUID(ev.account_id), _uuid(ev.keep_session_id),
                                                                  issued_before=env.occurred_at + ISSUE_MARGIN),
                                          service.Cause(ev.cause, event_id=env.id))

    async def on_passwords_changed(conn: asyncpg.Connection, batch: PasswordsChanged, env: Envelope) -> None:
        if batch.revoke_sessions and batch.account_ids:
            await service.cut_off_accounts(conn, topics, [uuid.UUID(a) for a in batch.account_ids],
                                           service.Cause(batch.cause, event_id=env.id, incident_id=batch.incident_id),
                                           key=batch.incident_id)

    return EventHandlers("devicesession.revoker", {
        PasswordChanged: on_password_changed,
        PasswordsChanged: on_passwords_changed,
    }, ignored=[AccountCreated, PasswordResetRequested, AccountResetRequired, AccountsResetRequired])


# How long a holder instance's seen-time may lag (expected_instances allows for it).
SEEN_GRANULARITY = 10.0


def make_ack_handler(pool: asyncpg.Pool) -> EventHandlers:
    """``revocations.applied``: the acknowledgement in the event's transaction; the holder's and the
    instance's seen-times on ``pool``, outside it (store.record_instance_seen), at most once per
    SEEN_GRANULARITY per instance and process (``refreshed`` is per process on purpose: losing it
    costs one more refresh)."""
    refreshed: dict[tuple[str, str], float] = {}

    async def on_ack(conn: asyncpg.Connection, ack: RevocationApplied, env: Envelope) -> None:
        holder, instance = ack.holder_id[:200], ack.instance_id[:200]
        await store.insert_ack(conn, uuid.UUID(ack.revocation_id), holder, parse_time(ack.applied_at), instance)
        now = time.monotonic()
        if now - refreshed.get((holder, instance), -SEEN_GRANULARITY) >= SEEN_GRANULARITY:
            await store.record_instance_seen(pool, holder, instance)
            if len(refreshed) > 100_000:
                refreshed.clear()
            refreshed[(holder, instance)] = now

    return EventHandlers("devicesession.acks", {RevocationApplied: on_ack})
