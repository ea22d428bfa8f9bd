"""Plain SQL over asyncpg for PINs, device codes and claim tokens.

Every state change is one conditional UPDATE (``... WHERE linked_at IS NULL AND expires_at > now()``),
so racing requests cannot link, approve, collect or redeem the same thing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg


@dataclass(frozen=True)
class Pin:
    id: int
    strong: bool
    client_identifier: str
    device: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    account_id: UUID | None
    linked_at: datetime | None


_PIN = "id, strong, client_identifier, device, created_at, expires_at, account_id, linked_at"


def _pin(row: asyncpg.Record | None) -> Pin | None:
    return Pin(**dict(row)) if row is not None else None


async def taken_codes(conn: asyncpg.Connection, hmacs: list[bytes]) -> set[bytes]:
    """Which of these code HMACs belong to a live PIN."""
    rows = await conn.fetch("SELECT code_hmac FROM pins WHERE code_hmac = ANY($1::bytea[]) AND expires_at > now()",
                            hmacs)
    return {bytes(r["code_hmac"]) for r in rows}


async def insert_pin(conn: asyncpg.Connection, code_hmac: bytes, strong: bool, client_identifier: str,
                     device: dict[str, Any], ttl: int) -> Pin | None:
    """Insert a PIN unless its code is live; an expired PIN holding the code is removed first."""
    async with conn.transaction():
        await conn.execute("DELETE FROM pins WHERE code_hmac = $1 AND expires_at <= now()", code_hmac)
        row = await conn.fetchrow(
            f"INSERT INTO pins (strong, code_hmac, client_identifier, device, expires_at)"
            f" VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))"
            f" ON CONFLICT (code_hmac) DO NOTHING RETURNING {_PIN}",
            strong, code_hmac, client_identifier, device, float(ttl),
        )
    return _pin(row)


async def live_short_pins(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    value: int = await conn.fetchval("SELECT count(*) FROM pins WHERE NOT strong AND expires_at > now()")
    return value


async def find_live_pin_by_code(conn: asyncpg.Connection | asyncpg.Pool, code_hmac: bytes) -> Pin | None:
    return _pin(await conn.fetchrow(
        f"SELECT {_PIN} FROM pins WHERE code_hmac = $1 AND expires_at > now() AND linked_at IS NULL", code_hmac))


async def find_pin(conn: asyncpg.Connection | asyncpg.Pool, pin_id: int) -> tuple[Pin, bool, bool] | None:
    """A live PIN by id, with (has a token waiting, collected or revoked)."""
    row = await conn.fetchrow(
        f"SELECT {_PIN}, sealed_token IS NOT NULL AS waiting, (collected_at IS NOT NULL OR revoked_at IS NOT NULL)"
        f" AS finished FROM pins WHERE id = $1 AND expires_at > now()",
        pin_id,
    )
    if row is None:
        return None
    pin = _pin({k: row[k] for k in _PIN.split(", ")})  # type: ignore[arg-type]
    assert pin is not None
    return pin, bool(row["waiting"]), bool(row["finished"])


async def link_pin(conn: asyncpg.Connection, pin_id: int, account_id: UUID, session_id: UUID, sealed: str) -> bool:
    done = await conn.fetchval(
        "UPDATE pins SET account_id = $2, linked_at = now(), session_id = $3, sealed_token = $4"
        " WHERE id = $1 AND linked_at IS NULL AND expires_at > now() RETURNING 1",
        pin_id, account_id, session_id, sealed,
    )
    return bool(done)


async def end_pin(conn: asyncpg.Connection | asyncpg.Pool, pin_id: int) -> bool:
    """A denied PIN (the auth app's Deny) ends at once: its poller gets 'not found' and stops."""
    done = await conn.fetchval(
        "UPDATE pins SET expires_at = now() WHERE id = $1 AND linked_at IS NULL AND expires_at > now() RETURNING 1",
        pin_id)
    return bool(done)


async def collect_pin(conn: asyncpg.Connection, pin_id: int, client_identifier: str) -> tuple[str, UUID] | None:
    """Take the waiting token (once) and erase it; only for the client that created the PIN."""
    row = await conn.fetchrow(
        """
        UPDATE pins p SET sealed_token = NULL, collected_at = now()
        FROM (SELECT id, sealed_token, account_id FROM pins WHERE id = $1 FOR UPDATE) old
        WHERE p.id = old.id AND p.client_identifier = $2 AND p.sealed_token IS NOT NULL AND p.expires_at > now()
        RETURNING old.sealed_token, old.account_id
        """,
        pin_id, client_identifier,
    )
    return (row["sealed_token"], row["account_id"]) if row else None


async def insert_device_code(conn: asyncpg.Connection, device_hmac: bytes, user_hmac: bytes, client_id: str,
                             scope: str, interval: int, ttl: int) -> bool:
    done = await conn.fetchval(
        "INSERT INTO device_codes (device_code_hmac, user_code_hmac, client_id, scope, poll_interval, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) ON CONFLICT DO NOTHING RETURNING 1",
        device_hmac, user_hmac, client_id, scope, interval, float(ttl),
    )
    return bool(done)


async def find_pending_user_code(conn: asyncpg.Connection | asyncpg.Pool, user_hmac: bytes) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, client_id, scope, created_at, expires_at FROM device_codes"
        " WHERE user_code_hmac = $1 AND status = 'pending' AND expires_at > now()",
        user_hmac,
    )


async def approve_device_code(conn: asyncpg.Connection, code_id: int, account_id: UUID, session_id: UUID,
                              sealed: str) -> bool:
    done = await conn.fetchval(
        "UPDATE device_codes SET status = 'approved', account_id = $2, approved_at = now(), session_id = $3,"
        " sealed_token = $4 WHERE id = $1 AND status = 'pending' AND expires_at > now() RETURNING 1",
        code_id, account_id, session_id, sealed,
    )
    return bool(done)


async def deny_device_code(conn: asyncpg.Connection, code_id: int, account_id: UUID) -> bool:
    done = await conn.fetchval(
        "UPDATE device_codes SET status = 'denied', account_id = $2 WHERE id = $1 AND status = 'pending'"
        " AND expires_at > now() RETURNING 1",
        code_id, account_id,
    )
    return bool(done)


async def poll_device_code(conn: asyncpg.Connection, device_hmac: bytes, client_id: str) -> asyncpg.Record | None:
    """Record a poll and return the code's state, the previous poll time and the interval.
    Polling too fast raises the interval by 5 seconds (RFC 8628 slow_down)."""
    return await conn.fetchrow(
        """
        UPDATE device_codes d SET
            last_poll_at = now(),
            poll_interval = CASE WHEN old.last_poll_at IS NOT NULL
                                  AND now() - old.last_poll_at < make_interval(secs => old.poll_interval)
                                 THEN old.poll_interval + 5 ELSE old.poll_interval END
        FROM (SELECT id, last_poll_at, poll_interval FROM device_codes WHERE device_code_hmac = $1 FOR UPDATE) old
        WHERE d.id = old.id AND d.client_id = $2
        RETURNING d.id, d.status, d.expires_at > now() AS live, d.account_id, d.sealed_token,
                  old.last_poll_at, old.poll_interval AS old_interval, d.poll_interval
        """,
        device_hmac, client_id,
    )


async def finish_device_code(conn: asyncpg.Connection, code_id: int) -> str | None:
    """Hand out the approved token once: erase it and mark the code done."""
    value: str | None = await conn.fetchval(
        """
        UPDATE device_codes d SET status = 'done', sealed_token = NULL
        FROM (SELECT id, sealed_token FROM device_codes WHERE id = $1 FOR UPDATE) old
        WHERE d.id = old.id AND d.status = 'approved' AND d.sealed_token IS NOT NULL RETURNING old.sealed_token
        """,
        code_id,
    )
    return value


async def erase_revoked(conn: asyncpg.Connection, session_ids: list[UUID], account_ids: list[UUID],
                        cutoff: datetime) -> int:
    """A revocation covers tokens waiting to be collected: erase them so they are never delivered."""
    a = await conn.execute(
        "UPDATE pins SET sealed_token = NULL, revoked_at = now() WHERE sealed_token IS NOT NULL"
        " AND (session_id = ANY($1::uuid[]) OR (account_id = ANY($2::uuid[]) AND linked_at <= $3))",
        session_ids, account_ids, cutoff,
    )
    b = await conn.execute(
        "UPDATE device_codes SET sealed_token = NULL, status = 'denied' WHERE sealed_token IS NOT NULL"
        " AND (session_id = ANY($1::uuid[]) OR (account_id = ANY($2::uuid[]) AND approved_at <= $3))",
        session_ids, account_ids, cutoff,
    )
    c = await conn.execute(
        "UPDATE claim_tokens SET sealed_session = NULL, revoked_at = now() WHERE used_at IS NULL"
        " AND revoked_at IS NULL AND (session_id = ANY($1::uuid[]) OR (account_id = ANY($2::uuid[])"
        " AND created_at <= $3))",
        session_ids, account_ids, cutoff,
    )
    return int(a.split()[-1]) + int(b.split()[-1]) + int(c.split()[-1])


async def insert_claim(conn: asyncpg.Connection | asyncpg.Pool, token_hmac: bytes, account_id: UUID,
                       session_id: UUID, sealed_session: str, ttl: int) -> datetime:
    value: datetime = await conn.fetchval(
        "INSERT INTO claim_tokens (token_hmac, account_id, session_id, sealed_session, expires_at)"
        " VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING expires_at",
        token_hmac, account_id, session_id, sealed_session, float(ttl),
    )
    return value


async def lock_claim(conn: asyncpg.Connection, token_hmac: bytes) -> asyncpg.Record | None:
    """A live claim token, locked until the exchange's transaction ends (a concurrent exchange of the
    same token waits, then finds it used)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT account_id, session_id, sealed_session FROM claim_tokens WHERE token_hmac = $1 AND used_at IS NULL"
        " AND revoked_at IS NULL AND expires_at > now() FOR UPDATE",
        token_hmac,
    )
    return row


async def use_claim(conn: asyncpg.Connection, token_hmac: bytes) -> None:
    await conn.execute("UPDATE claim_tokens SET used_at = now(), sealed_session = NULL WHERE token_hmac = $1",
                       token_hmac)


async def purge_expired(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    await conn.execute("DELETE FROM pins WHERE expires_at < now() - interval '1 hour'")
    await conn.execute("DELETE FROM device_codes WHERE expires_at < now() - interval '1 hour'")
    await conn.execute("DELETE FROM claim_tokens WHERE expires_at < now() - interval '1 hour'")
