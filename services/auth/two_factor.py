"""Two-step verification: TOTP (RFC 6238, 6 digits, 30 s) with recovery codes, in Plex's wire format.

Storage (migration 0005): the TOTP secret only sealed (AES-256-GCM under TWO_FACTOR_SEAL_KEYS, key id
in the value, bound to the account id); recovery codes only as HMACs (TOKEN_HMAC_KEY), each redeemed by
one conditional UPDATE; an enrollment that is started and never confirmed expires after
TWO_FACTOR_ENROLL_TTL seconds.

Replay: accepting a code raises the account's ``last_used_step`` to the code's time step in one
conditional UPDATE (``WHERE last_used_step < step``), so a code is accepted once, whichever replica
sees it; a code of an older step than one already used is refused too (RFC 6238, section 5.2).

Wrong codes: every code attempt first takes its place in the per-account code budget, atomically,
before the code is checked; past TWO_FACTOR_FREE_FAILURES wrong codes in TWO_FACTOR_WINDOW seconds
each one blocks the account's codes for 2^n seconds (capped at SIGNIN_MAX_BLOCK), answered with 429
and Retry-After. A correct code clears the budget. Concurrent guesses therefore cannot exceed it.
- A sign-in with a 6-digit code reserves the code's place in the password's own reservation
  statement (shared.throttle's reading with a further scope), which also reads the sealed secret;
  a wrong password gives the place back uncounted, so guessing passwords never spends the code
  budget. A right code uses its time step, clears the budget and settles the password's reservation
  in one statement (:func:`shared.throttle.settle_if`): two statements per sign-in, as without two-step.
- Other code attempts (a recovery code, the digits appended to the password, the web's second step,
  disable, regenerate, confirm) count one attempt in one statement that refuses while blocked
  (:func:`shared.throttle.count_attempt`), once the password is known to be right.

Errors (Plex shape): 401 code 1029 "Please enter the verification code" when a code is needed and
missing (python-plexapi raises TwoFactorRequired on those words), 401 code 1029 "The verification
code is wrong or was already used", 1111 (429) too many attempts, 1117 (409) already enabled,
1118 (400) no enrollment in progress (or it expired), 1119 (409) two-step verification is off.
"""

from __future__ import annotations

import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

import asyncpg
import pyotp

from services.auth import events, store
from services.auth.errors import SignInThrottled
from shared import outbox, throttle, tokens
from shared.crypto import Sealer, SealError
from shared.errors import Conflict, Unauthorized, ValidationFailed
from shared.events import (
    Envelope,
    TwoFactorDisabled,
    TwoFactorEnabled,
    TwoFactorRecoveryCodeUsed,
    envelope,
    iso,
    utcnow,
)

if TYPE_CHECKING:
    from services.auth.service import Auth

T = TypeVar("T")
STEP = 30
DIGITS = 6
ISSUER = "Hearth"
RECOVERY_CODES = 10
# Recovery codes: 10 characters from an alphabet without look-alikes (50 bits), shown as xxxxx-xxxxx.
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
_RECOVERY_LENGTH = 10
_TOTP = re.compile(r"^\d{6}$")
# The code budget's scopes: the account's, or (a code sent with a login that names no account) the login's.
TWO_FACTOR_ACCOUNT_SCOPE = "2fa:account:"
TWO_FACTOR_LOGIN_SCOPE = "2fa:login:"
_APPENDED = re.compile(r"^(.+)(\d{6})$", re.DOTALL)


class TwoFactorRequired(Unauthorized):
    code = "verification_code_required"
    title = "Please enter the verification code"
    plex_code = 1029


class WrongVerificationCode(Unauthorized):
    code = "invalid_verification_code"
    title = "The verification code is wrong or was already used"
    plex_code = 1029


class AlreadyEnabled(Conflict):
    code = "two_factor_already_enabled"
    title = "Two-step verification is already on; turn it off first to set it up again"
    plex_code = 1117


class NoEnrollment(ValidationFailed):
    code = "no_two_factor_enrollment"
    title = "No two-step verification set-up is in progress (or it expired); start again"
    plex_code = 1118


class NotEnabled(Conflict):
    code = "two_factor_not_enabled"
    title = "Two-step verification is not on for this account"
    plex_code = 1119


class PendingSigninInvalid(ValidationFailed):
    code = "pending_signin_invalid"
    title = "This sign-in has expired; enter your password again"
    plex_code = 1125


@dataclass(frozen=True)
class Status:
    enabled: bool
    pending: bool
    recovery_codes_left: int
    enabled_at: datetime | None = None


def one_time_code(code: str | None) -> str | None:
    """``code`` when it has the shape of a TOTP code (6 ASCII digits, spaces allowed), compacted; else None."""
    if not code or len(code) > 64:
        return None
    compact = code.strip().replace(" ", "")
    return compact if len(compact) == DIGITS and compact.isascii() and compact.isdigit() else None


def normalise_recovery(code: str) -> str:
    return re.sub(r"[\s-]", "", code).lower()


def new_recovery_code() -> str:
    raw = tokens.random_code(_RECOVERY_ALPHABET, _RECOVERY_LENGTH)
    return f"{raw[:5]}-{raw[5:]}"


def otpauth_uri(secret: str, username: str) -> str:
    """``otpauth://totp/Hearth:<username>?secret=...&issuer=Hearth`` (Google Authenticator's key URI)."""
    return f"otpauth://totp/{quote(ISSUER)}:{quote(username)}?secret={secret}&issuer={quote(ISSUER)}"


def matching_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step (t-1, t or t+1: one step of clock drift either way) whose code equals ``code``;
    every candidate is compared in constant time."""
    if not _TOTP.match(code):
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    t = int((time.time() if now is None else now) // STEP)
    found = None
    for step in (t - 1, t, t + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found


# --------------------------------------------------------------------------------- SQL


def _status_select(account: str) -> str:
    """The two-step status of the account in parameter ``account``."""
    return ("SELECT sealed_secret, enabled_at, pending_expires_at, last_used_step,"
            f" (SELECT count(*) FROM recovery_codes r WHERE r.account_id = {account} AND r.used_at IS NULL)"
            f" AS codes_left FROM two_factor WHERE account_id = {account}")


_STATUS_SQL = _status_select("$1")
# The status read inside the code budget's statement ($5: the account), and its columns in the answer.
_STATUS_READ = f"tfs AS ({_status_select('$5')})"
_STATUS_ANSWER = ", ".join(f"(SELECT {c} FROM tfs) AS {c}" for c in
                           ("sealed_secret", "enabled_at", "pending_expires_at", "last_used_step", "codes_left"))


async def _status(conn: asyncpg.Connection | asyncpg.Pool, account_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(_STATUS_SQL, account_id)


# settle_if's gate for a TOTP code ($5: the account, $6: the code's time step): the step is used once.
_STEP_GATE = ("gate AS (UPDATE two_factor SET last_used_step = $6 WHERE account_id = $5 AND enabled_at IS NOT NULL"
              " AND last_used_step < $6 RETURNING 1)")


async def _use_step(conn: asyncpg.Connection | asyncpg.Pool, account_id: uuid.UUID, step: int, scope: str) -> bool:
    """Use the time step once (no replay) and, when it was unused, forgive the code budget's
    attempts in ``scope``, in one statement."""
    done = await conn.fetchval(
        "WITH used AS (UPDATE two_factor SET last_used_step = $2 WHERE account_id = $1 AND enabled_at IS NOT NULL"
        f" AND last_used_step < $2 RETURNING 1), {throttle.clearing('$3', 'EXISTS (SELECT 1 FROM used)')}"
        " SELECT count(*) FROM used", account_id, step, scope)
    return bool(done)


async def _redeem_recovery(conn: asyncpg.Connection, account_id: uuid.UUID, code_hmac: bytes) -> int | None:
    """Mark one unused recovery code used (one conditional UPDATE); the number left, or None."""
    row = await conn.fetchrow(
        """
        WITH used AS (UPDATE recovery_codes SET used_at = now()
                      WHERE account_id = $1 AND code_hmac = $2 AND used_at IS NULL RETURNING 1)
        SELECT (SELECT count(*) FROM used) AS used,
               (SELECT count(*) FROM recovery_codes WHERE account_id = $1 AND used_at IS NULL) AS unused
        """, account_id, code_hmac)
    assert row is not None
    if not row["used"]:
        return None
    return int(row["unused"]) - 1  # the outer SELECT sees the snapshot before the UPDATE


async def _replace_recovery(conn: asyncpg.Connection, account_id: uuid.UUID, hmacs: list[bytes]) -> None:
    await conn.execute("DELETE FROM recovery_codes WHERE account_id = $1", account_id)
    await conn.execute("INSERT INTO recovery_codes (account_id, code_hmac) SELECT $1, unnest($2::bytea[])",
                       account_id, hmacs)


async def disable_rows(conn: asyncpg.Connection, account_id: uuid.UUID) -> bool:
    """Turn 2FA off: the secret and every recovery code go. False when it was not on."""
    done = await conn.fetchval("DELETE FROM two_factor WHERE account_id = $1 AND enabled_at IS NOT NULL RETURNING 1",
                               account_id)
    await conn.execute("DELETE FROM recovery_codes WHERE account_id = $1", account_id)
    return bool(done)


async def purge_expired(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    await conn.execute("DELETE FROM two_factor WHERE enabled_at IS NULL AND pending_expires_at < now()")
    await conn.execute("DELETE FROM pending_signins WHERE expires_at < now() - interval '1 hour'")


def disabled_event(account: store.Account, *, by: str, reason: str | None) -> Envelope:
    return envelope(TwoFactorDisabled(account_id=str(account.id), email=account.email, username=account.username,
                                      by=by, reason=reason, disabled_at=iso(utcnow())),
                    producer=events.PRODUCER, key=str(account.id))


# --------------------------------------------------------------------------------- service


class TwoFactor:
    def __init__(self, auth: Auth, seal_keys: str) -> None:
        self.auth = auth
        self.pool = auth.pool
        self.s = auth.s
        self.sealer = Sealer(seal_keys)
        self.key = auth.key

    def _context(self, account_id: uuid.UUID) -> str:
        return f"two-factor:{account_id}"

    def _secret(self, account_id: uuid.UUID, sealed: str) -> str:
        return self.sealer.open(sealed, context=self._context(account_id))

    def _recovery_hmac(self, account_id: uuid.UUID, code: str) -> bytes:
        return tokens.digest(self.key, f"{account_id}:{normalise_recovery(code)}", purpose="recovery")

    def _new_codes(self, account_id: uuid.UUID) -> tuple[list[str], list[bytes]]:
        codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]
        return codes, [self._recovery_hmac(account_id, c) for c in codes]

    async def status(self, account_id: uuid.UUID) -> Status:
        row = await _status(self.pool, account_id)
        if row is None:
            return Status(False, False, 0)
        enabled = row["enabled_at"] is not None
        pending = not enabled and row["pending_expires_at"] is not None and row["pending_expires_at"] > utcnow()
        return Status(enabled, pending, int(row["codes_left"]) if enabled else 0, row["enabled_at"])

    # ------------------------------------------------------------------ enrollment

    async def start(self, account: store.Account) -> tuple[str, str]:
        """A new secret for a pending enrollment (replacing any pending one); returns (secret, uri)."""
        secret = pyotp.random_base32(32)  # 160 bits, RFC 4226's recommended key length
        sealed = self.sealer.seal(secret, context=self._context(account.id))
        expires = utcnow() + timedelta(seconds=self.s.two_factor_enroll_ttl)
        done = await self.pool.fetchval(
            "INSERT INTO two_factor AS t (account_id, sealed_secret, pending_expires_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (account_id) DO UPDATE SET sealed_secret = EXCLUDED.sealed_secret,"
            " pending_expires_at = EXCLUDED.pending_expires_at, created_at = now(), last_used_step = 0"
            " WHERE t.enabled_at IS NULL RETURNING 1", account.id, sealed, expires)
        if not done:
            raise AlreadyEnabled()
        return secret, otpauth_uri(secret, account.username)

    async def confirm(self, account: store.Account, code: str | None) -> list[str]:
        """Enable with a current code; returns the recovery codes (their only appearance)."""
        row = await _status(self.pool, account.id)
        if row is not None and row["enabled_at"] is not None:
            raise AlreadyEnabled()
        if row is None or row["pending_expires_at"] is None or row["pending_expires_at"] <= utcnow():
            raise NoEnrollment()
        code = (code or "").strip().replace(" ", "")
        await self._reserve(account.id)
        step = matching_step(self._secret(account.id, row["sealed_secret"]), code)
        if step is None:
            raise WrongVerificationCode()
        codes, hmacs = self._new_codes(account.id)
        async with self.pool.acquire() as conn, conn.transaction():
            enabled_at = await conn.fetchval(
                "UPDATE two_factor SET enabled_at = now(), pending_expires_at = NULL, last_used_step = $3"
                " WHERE account_id = $1 AND sealed_secret = $2 AND enabled_at IS NULL AND pending_expires_at > now()"
                " RETURNING enabled_at", account.id, row["sealed_secret"], step)
            if enabled_at is None:
                raise NoEnrollment()  # restarted, expired or confirmed concurrently
            await _replace_recovery(conn, account.id, hmacs)
            await events.publish(conn, self.auth.topics.auth_events, TwoFactorEnabled(
                account_id=str(account.id), email=account.email, username=account.username,
                enabled_at=iso(enabled_at)), key=str(account.id))
        await self._clear(account.id)
        return codes

    async def disable(self, account: store.Account, password: str | None, code: str | None, address: str) -> None:
        await self.auth.confirm_password(account, password, address)
        if not (await self.status(account.id)).enabled:
            raise NotEnabled()
        await self.verify(account, code, emit_recovery=False)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await disable_rows(conn, account.id):
                raise NotEnabled()
            await outbox.add(conn, self.auth.topics.auth_events,
                             disabled_event(account, by="user", reason=None))

    async def regenerate(self, account: store.Account, password: str | None, code: str | None,
                         address: str) -> list[str]:
        await self.auth.confirm_password(account, password, address)
        if not (await self.status(account.id)).enabled:
            raise NotEnabled()
        await self.verify(account, code, emit_recovery=False)
        codes, hmacs = self._new_codes(account.id)
        async with self.pool.acquire() as conn, conn.transaction():
            await _replace_recovery(conn, account.id, hmacs)
        return codes

    # ------------------------------------------------------------------ codes

    def _scope(self, account_id: uuid.UUID) -> str:
        return f"{TWO_FACTOR_ACCOUNT_SCOPE}{account_id}"

    async def _reserve(self, account_id: uuid.UUID) -> asyncpg.Record | None:
        """Count the attempt against the account's code budget; the account's two-step status (read
        in the same statement), or None when it has none."""
        s = self.s
        wait, row = await throttle.count_attempt(
            self.auth.counters, self._scope(account_id), free=s.two_factor_free_failures, window=s.two_factor_window,
            max_block=s.signin_max_block, read=_STATUS_READ, columns=_STATUS_ANSWER, args=(account_id,))
        throttle.refuse_if_waiting(wait, SignInThrottled, "Too many wrong verification codes")
        return row if row["sealed_secret"] is not None else None

    async def _clear(self, account_id: uuid.UUID) -> None:
        await throttle.clear(self.pool, self._scope(account_id))

    async def verify(self, account: store.Account, code: str | None, *, emit_recovery: bool = True,
                     conn: asyncpg.Connection | None = None) -> str:
        """Accept a current TOTP code (once per time step) or an unused recovery code; returns
        ``totp`` or ``recovery``. Raises TwoFactorRequired, WrongVerificationCode, SignInThrottled.
        With ``conn`` (in a transaction), the code is used up in that transaction: if it rolls back,
        the code can be used again."""
        code = (code or "").strip()
        if not code:
            raise TwoFactorRequired()
        if len(code) > 64:
            raise WrongVerificationCode()
        row = await self._reserve(account.id)
        compact = one_time_code(code)
        if compact is not None:
            if row is None or row["enabled_at"] is None:
                raise WrongVerificationCode()
            try:
                secret = self._secret(account.id, row["sealed_secret"])
            except SealError:
                raise WrongVerificationCode() from None  # a key was removed from TWO_FACTOR_SEAL_KEYS
            step = matching_step(secret, compact)
            if step is None or not await _use_step(conn or self.pool, account.id, step, self._scope(account.id)):
                raise WrongVerificationCode()
            return "totp"
        if conn is not None:
            await self._redeem(conn, account, code, emit_recovery)
        else:
            async with self.pool.acquire() as own, own.transaction():
                await self._redeem(own, account, code, emit_recovery)
        await self._clear(account.id)
        return "recovery"

    async def verify_reserved(self, account: store.Account, code: str, sealed: str, scopes: list[tuple[str, int]],
                              code_scope: tuple[str, int]) -> None:
        """Sign-in's second factor when its reservation already holds a place in the code budget
        (``code_scope``) beside the password's ``scopes``, and read the sealed secret: a right code
        uses its time step, forgives the code budget and settles the password's reservation in
        one statement (committed durably: a used step must survive a crash). A wrong or replayed
        code settles the password (it was right) and counts in the code budget. Raises
        WrongVerificationCode."""
        try:
            step = matching_step(self._secret(account.id, sealed), code)
        except SealError:
            step = None  # a key was removed from TWO_FACTOR_SEAL_KEYS
        if step is None:
            await self.auth._succeeded(scopes)
        else:
            try:
                used = await throttle.settle_if(self.pool, scopes[0][0], scopes[1:], gated=code_scope[0],
                                                gate=_STEP_GATE, args=(account.id, step))
            except Exception:
                await throttle.release(self.auth.counters, [*scopes, code_scope])  # the statement wrote nothing
                raise
            if used:
                return
        await throttle.fail(self.auth.counters, [code_scope], window=self.s.two_factor_window,
                            max_block=self.s.signin_max_block)
        raise WrongVerificationCode()

    async def _redeem(self, conn: asyncpg.Connection, account: store.Account, code: str, emit: bool) -> None:
        left = await _redeem_recovery(conn, account.id, self._recovery_hmac(account.id, code))
        if left is None:
            raise WrongVerificationCode()
        if emit:
            await events.publish(conn, self.auth.topics.auth_events, TwoFactorRecoveryCodeUsed(
                account_id=str(account.id), email=account.email, username=account.username, codes_left=left,
                used_at=iso(utcnow())), key=str(account.id))

    @staticmethod
    def split_appended(password: str) -> tuple[str, str] | None:
        """Old apps that cannot ask for a code send the password with the 6 digits appended."""
        m = _APPENDED.match(password)
        return (m.group(1), m.group(2)) if m else None

    # ------------------------------------------------------------------ the web's second step

    async def start_pending(self, account_id: uuid.UUID, remember: bool) -> str:
        token = tokens.new_token(32)
        await self.pool.execute(
            "INSERT INTO pending_signins (token_hmac, account_id, remember, expires_at)"
            " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
            tokens.digest(self.key, token, purpose="pending-signin"), account_id, remember,
            float(self.s.pending_signin_ttl))
        return token

    async def finish_pending(self, token: str | None, code: str | None,
                             then: Callable[[store.Account, bool], Awaitable[T]]) -> T:
        """Check the second factor of a pending sign-in and use both up, once, in one transaction with
        ``then(account, remember)`` (the session's mint): if the mint fails, the pending sign-in and
        the code stay usable and the same step can be retried."""
        if not token or len(token) > 100:
            raise PendingSigninInvalid()
        token_hmac = tokens.digest(self.key, token, purpose="pending-signin")
        async with self.pool.acquire() as conn, conn.transaction():
            # Taking the row first makes a second submission of the same step wait for this one.
            row = await conn.fetchrow(
                "UPDATE pending_signins SET used_at = now() WHERE token_hmac = $1 AND used_at IS NULL"
                " AND expires_at > now() RETURNING account_id, remember", token_hmac)
            account = await store.find_by_id(conn, row["account_id"]) if row else None
            if row is None or account is None:
                raise PendingSigninInvalid()
            await self.verify(account, code, conn=conn)
            return await then(account, bool(row["remember"]))

