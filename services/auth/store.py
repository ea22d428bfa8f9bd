"""Plain SQL over asyncpg for accounts, reset tokens and throttles.

Uniqueness of emails and usernames is the database's job (unique normalised columns); a reset
token is redeemed with one conditional UPDATE, so two concurrent redemptions cannot both succeed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from shared import throttle


@dataclass(frozen=True)
class Account:
    id: UUID
    num: int
    email: str
    username: str
    password_hash: str
    created_at: datetime
    password_changed_at: datetime | None
    reset_required_at: datetime | None
    reset_required_reason: str | None
    two_factor_on: bool = False  # two-step verification enabled (read with the account: sign-in needs it)


_COLS = ("id, num, email, username, password_hash, created_at, password_changed_at, reset_required_at,"
         " reset_required_reason")


# Reads of an existing account say in the same query whether it has two-step verification on.
_READ = (f"{_COLS}, EXISTS (SELECT 1 FROM two_factor tf WHERE tf.account_id = accounts.id"
         f" AND tf.enabled_at IS NOT NULL) AS two_factor_on")


def login_column(login_norm: str) -> str:
    """The column a normalised login names: an email always contains '@', a username never does."""
    return "email_norm" if "@" in login_norm else "username_norm"


def _account(row: asyncpg.Record | None) -> Account | None:
    return Account(**dict(row)) if row is not None else None


async def insert_account(conn: asyncpg.Connection, account_id: UUID, email: str, email_norm: str, username: str,
                         username_norm: str, password_hash: str) -> Account:
    row = await conn.fetchrow(
        f"INSERT INTO accounts (id, email, email_norm, username, username_norm, password_hash)"
        f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLS}",
        account_id, email, email_norm, username, username_norm, password_hash,
    )
    account = _account(row)
    assert account is not None
    return account


async def find_by_login(conn: asyncpg.Connection | asyncpg.Pool, login_norm: str) -> Account | None:
    """By normalised email or username (:func:`login_column`)."""
    return _account(await conn.fetchrow(f"SELECT {_READ} FROM accounts WHERE {login_column(login_norm)} = $1",
                                        login_norm))


_FIELDS = [f.name for f in dataclasses.fields(Account)]


# The account's columns in a login_reading answer (all NULL when the login names no account).
_ACCT_ANSWER = ", ".join(f"(SELECT {c} FROM acct) AS {c}" for c in _FIELDS)
# The lookup CTE per login column ($4: the normalised login), built once.
_ACCT_CTE = {column: f"acct AS (SELECT {_READ} FROM accounts WHERE {column} = $4)"
             for column in ("email_norm", "username_norm")}
_ACCT_LEAD = "coalesce($5 || (SELECT id::text FROM acct), $6)"


# A sign-in that carries a one-time code also reserves the code budget's scope ($7 + the account id,
# else $8) and reads the sealed TOTP secret of an account with two-step verification on.
_CODE_LEAD = "coalesce($7 || (SELECT id::text FROM acct), $8)"
_CODE_ANSWER = (_ACCT_ANSWER + ", (SELECT sealed_secret FROM two_factor WHERE account_id = (SELECT id FROM acct)"
                " AND enabled_at IS NOT NULL) AS sealed_secret")


@dataclasses.dataclass(frozen=True)
class CodeBudget:
    """The code budget a sign-in with a one-time code reserves beside the password's: scope
    ``account_prefix`` + the account id, or ``unknown_scope`` when the login names no account."""

    account_prefix: str
    unknown_scope: str
    free: int
    window: int


def login_reading(login_norm: str, unknown_scope: str, account_scope_prefix: str, free: int,
                  code: CodeBudget | None = None) -> throttle.Reading:
    """Sign-in's account lookup, done inside its throttle reservation (one round trip): the lead
    scope is ``account_scope_prefix`` + the account id when the login names an account, else
    ``unknown_scope``; the answer carries the account's columns (all NULL when there is none).
    With ``code``, the code budget's scope is reserved second and the answer carries
    ``sealed_secret`` (NULL unless two-step verification is on)."""
    args: tuple[object, ...] = (login_norm, account_scope_prefix, unknown_scope)
    if code is None:
        return throttle.Reading(cte=_ACCT_CTE[login_column(login_norm)], lead=_ACCT_LEAD, free=free,
                                columns=_ACCT_ANSWER, args=args)
    return throttle.Reading(cte=_ACCT_CTE[login_column(login_norm)], lead=_ACCT_LEAD, free=free,
                            columns=_CODE_ANSWER, args=(*args, code.account_prefix, code.unknown_scope),
                            more=((_CODE_LEAD, code.free, code.window),))


def account_of(row: asyncpg.Record) -> Account | None:
    """The account in a :func:`login_reading` answer."""
    return Account(**{c: row[c] for c in _FIELDS}) if row["id"] is not None else None


async def find_by_id(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID) -> Account | None:
    return _account(await conn.fetchrow(f"SELECT {_READ} FROM accounts WHERE id = $1", account_id))


async def update_password_hash(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID, old_hash: str,
                               new_hash: str) -> None:
    """Rehash on sign-in: only if nobody changed the password meanwhile."""
    await conn.execute("UPDATE accounts SET password_hash = $3 WHERE id = $1 AND password_hash = $2",
                       account_id, old_hash, new_hash)


async def set_password(conn: asyncpg.Connection, account_id: UUID, new_hash: str) -> datetime:
    """A password change: new hash, change time, reset-required flag cleared."""
    changed: datetime = await conn.fetchval(
        "UPDATE accounts SET password_hash = $2, password_changed_at = now(), reset_required_at = NULL,"
        " reset_required_reason = NULL, reset_required_incident = NULL WHERE id = $1 RETURNING password_changed_at",
        account_id, new_hash,
    )
    return changed


async def flag_reset_required(conn: asyncpg.Connection, account_id: UUID, reason: str, incident: str | None) -> bool:
    done = await conn.fetchval(
        "UPDATE accounts SET reset_required_at = now(), reset_required_reason = $2, reset_required_incident = $3"
        " WHERE id = $1 RETURNING 1",
        account_id, reason, incident,
    )
    return bool(done)


async def insert_reset_token(conn: asyncpg.Connection, token_hmac: bytes, account_id: UUID, expires_at: datetime,
                             incident_id: str | None = None) -> None:
    await conn.execute(
        "INSERT INTO reset_tokens (token_hmac, account_id, expires_at, incident_id) VALUES ($1, $2, $3, $4)",
        token_hmac, account_id, expires_at, incident_id,
    )


async def peek_reset_token(conn: asyncpg.Connection | asyncpg.Pool, token_hmac: bytes) -> UUID | None:
    """The account of a live (unused, not invalidated, unexpired) reset token."""
    value: UUID | None = await conn.fetchval(
        "SELECT account_id FROM reset_tokens WHERE token_hmac = $1 AND used_at IS NULL AND invalidated_at IS NULL"
        " AND expires_at > now()",
        token_hmac,
    )
    return value


async def consume_reset_token(conn: asyncpg.Connection, token_hmac: bytes) -> UUID | None:
    """Redeem atomically: succeeds once; then invalidates the account's other outstanding tokens."""
    account_id: UUID | None = await conn.fetchval(
        "UPDATE reset_tokens SET used_at = now() WHERE token_hmac = $1 AND used_at IS NULL"
        " AND invalidated_at IS NULL AND expires_at > now() RETURNING account_id",
        token_hmac,
    )
    if account_id is not None:
        await conn.execute(
            "UPDATE reset_tokens SET invalidated_at = now() WHERE account_id = $1 AND used_at IS NULL"
            " AND invalidated_at IS NULL",
            account_id,
        )
    return account_id


async def invalidate_reset_tokens(conn: asyncpg.Connection, account_id: UUID) -> None:
    await conn.execute("UPDATE reset_tokens SET invalidated_at = now() WHERE account_id = $1 AND used_at IS NULL"
                       " AND invalidated_at IS NULL", account_id)


async def purge_expired(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    await conn.execute("DELETE FROM reset_tokens WHERE expires_at < now() - interval '7 days'")
    await conn.execute("DELETE FROM password_change_requests WHERE created_at < now() - interval '1 day'")


async def insert_change_request(conn: asyncpg.Connection, request_id: str, account_id: UUID, event_id: UUID) -> None:
    await conn.execute("INSERT INTO password_change_requests (request_id, account_id, event_id) VALUES ($1, $2, $3)",
                       request_id, account_id, event_id)


async def find_change_request(conn: asyncpg.Connection | asyncpg.Pool, request_id: str
                              ) -> tuple[UUID, UUID] | None:
    """(account id, event id) of the password change this request already made, if any."""
    row = await conn.fetchrow("SELECT account_id, event_id FROM password_change_requests WHERE request_id = $1",
                              request_id)
    return (row["account_id"], row["event_id"]) if row else None
