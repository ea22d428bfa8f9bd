"""devicesession's consumers: it turns password changes into revocations and records holders'
acknowledgements.

- ``auth.events`` / ``password.changed``: when ``revoke_sessions`` is set, revoke every session of
  the account except ``keep_session_id`` in one statement and publish one ``sessions.revoked``.
- ``auth.events`` / ``passwords.changed`` (the breach command's batch form): revoke every session of
  every listed account in one statement; one ``sessions.revoked`` naming the accounts.
- ``revocations.applied``: store each holder instance's acknowledgement (the fan-out view), and
  when each instance was first and last heard of (``holder_instances``).

All run in the ConsumerRunner's transaction with its processed-events marker, and the revocation is
also unique on its causing event id: a redelivered event revokes nothing twice and publishes nothing.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg

from services.devicesession import service, store
from shared.events import (
    Envelope,
    PasswordChanged,
    PasswordsChanged,
    RevocationApplied,
    decode_data,
    parse_time,
)

ISSUE_MARGIN = timedelta(milliseconds=50)


def _uuid(value: str | None) -> uuid.UUID | None:
    if not value:
        return None
    return uuid.UUID(value)


def make_auth_handler(topics: service.Topics):  # type: ignore[no-untyped-def]
    async def handle_auth_event(conn: asyncpg.Connection, env: Envelope) -> None:
        if env.type == PasswordChanged.TYPE:
            ev = decode_data(env, PasswordChanged)
            if not ev.revoke_sessions:
                return
            # Sessions signed in after the change (with the new password) are not the change's to revoke,
            # even when its event arrives late (a consumer replica died, a broker failed over). The
            # margin absorbs clock skew between auth's host and the database (NTP keeps it far below).
            await service.revoke(conn, topics, cause=ev.cause, causing_event_id=env.id,
                                 account_id=uuid.UUID(ev.account_id), except_session_id=_uuid(ev.keep_session_id),
                                 issued_before=env.occurred_at + ISSUE_MARGIN)
        elif env.type == PasswordsChanged.TYPE:
            batch = decode_data(env, PasswordsChanged)
            if not batch.revoke_sessions or not batch.account_ids:
                return
            await service.revoke(conn, topics, cause=batch.cause, causing_event_id=env.id,
                                 account_ids=[uuid.UUID(a) for a in batch.account_ids],
                                 key_account=batch.incident_id, incident_id=batch.incident_id)

    return handle_auth_event


async def handle_ack(conn: asyncpg.Connection, env: Envelope) -> None:
    ack = decode_data(env, RevocationApplied)
    await store.insert_ack(conn, uuid.UUID(ack.revocation_id), ack.holder_id[:200], parse_time(ack.applied_at),
                           ack.instance_id[:200])
