"""auth's domain logic: accounts, sign-in, password policy, reset and change. Knows no HTTP.

Invariants:
- Every password change (reset, change, forced) updates the hash, stamps ``password_changed_at``,
  clears the reset-required flag and writes ``password.changed`` in ONE transaction.
- Reset tokens (>= 256 bits) exist in plaintext only inside the sealed event for notification; the
  database holds their HMAC; redemption is a single conditional UPDATE.
- Sign-in answers an unknown login exactly like a wrong password, after the same argon2 work.
- Throttling scopes are keyed by the normalised login string and the client address, never by
  whether an account exists.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

import asyncpg

from services.auth import events, store
from services.auth.errors import (
    BadCredentials,
    EmailTaken,
    InvalidField,
    InvalidResetToken,
    ResetRequired,
    SignInThrottled,
    UsernameTaken,
    WeakPassword,
)
from services.auth.settings import Settings
from services.auth.two_factor import TWO_FACTOR_ACCOUNT_SCOPE, TWO_FACTOR_LOGIN_SCOPE, one_time_code
from shared import logs, throttle, tokens
from shared.crypto import Sealer
from shared.events import (
    AccountCreated,
    AccountResetRequired,
    Envelope,
    PasswordChanged,
    PasswordResetRequested,
    iso,
    utcnow,
)
from shared.passwords import Passwords, VerifyResult

T = TypeVar("T")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"^[^@\s\x00-\x1f]{{1,64}}@{_LABEL}(?:\.{_LABEL})+$")
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}$")
# Sign-in budgets: the account's, whichever login names it, or the login string's when none does.
_ACCOUNT_SCOPE = "signin:account:"
_LOGIN_SCOPE = "signin:login:"


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The 30,000 most common passwords, from zxcvbn's bundled (offline) frequency list."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def normalise_email(email: str) -> str:
    return unicodedata.normalize("NFKC", email).strip().lower()


def normalise_login(login: str) -> str:
    return unicodedata.normalize("NFKC", login).strip().lower()


def check_email(email: str | None) -> str:
    if not email:
        raise InvalidField("email is required", field="email")
    email = unicodedata.normalize("NFKC", email).strip()
    if len(email) > 254 or not _EMAIL.match(email):
        raise InvalidField("email is not a valid address", field="email")
    local, _, domain = email.rpartition("@")
    return f"{local}@{domain.lower()}"  # domains are case-insensitive; the local part is kept as typed


def check_username(username: str | None) -> str:
    if not username:
        raise InvalidField("username is required", field="username")
    username = username.strip()
    if not _USERNAME.match(username):
        raise InvalidField("username must be 3-32 letters, digits, '.', '_' or '-', starting with a letter or digit",
                           field="username")
    return username


def check_password(password: str | None, *, email: str, username: str) -> str:
    """The policy; the error names the rule that failed."""
    if not password:
        raise WeakPassword("password is required", field="password")
    if len(password) < MIN_PASSWORD:
        raise WeakPassword(f"the password must have at least {MIN_PASSWORD} characters", field="password")
    if len(password) > MAX_PASSWORD:
        raise WeakPassword(f"the password must have at most {MAX_PASSWORD} characters", field="password")
    lowered = password.lower()
    if lowered in common_passwords():
        raise WeakPassword("this password is too common; choose another", field="password")
    local = email.split("@", 1)[0].lower()
    if lowered == email.lower() or (len(local) >= 4 and local in lowered):
        raise WeakPassword("the password must not contain your email address", field="password")
    if username and username.lower() in lowered:
        raise WeakPassword("the password must not contain your username", field="password")
    return password


def _discard(job: asyncio.Future[Any] | None) -> None:
    """Cancel a job whose result is no longer wanted (a hash that has not started yet never runs),
    and read its outcome so that nothing is reported as never retrieved."""
    if job is not None:
        job.cancel()
        job.add_done_callback(lambda done: done.cancelled() or done.exception())


class Reserved(NamedTuple):
    """A sign-in's reservation: the account the login names, the password's scopes, and, when a
    one-time code came along, the code budget's scope and the sealed TOTP secret (None unless the
    account has two-step verification on)."""

    account: store.Account | None
    scopes: list[tuple[str, int]]
    code_scope: tuple[str, int] | None = None
    sealed_secret: str | None = None


@dataclass(frozen=True)
class Topics:
    auth_events: str


@dataclass(frozen=True)
class Changed:
    """A committed password change: its ``password.changed`` event id, and the event itself when
    this call committed it (None when an earlier try of the same request did)."""

    event_id: str
    envelope: Envelope | None = None


class Auth:
    """The service object: settings, pool, hasher, sealer."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, passwords: Passwords, topics: Topics, *,
                 counters: asyncpg.Pool | None = None) -> None:
        self.s = settings
        self.pool = pool
        # Sign-in's and two-step's throttle writes (reservations, settlements, failures): a pool whose
        # commits do not wait for the WAL flush (see app.py); the main pool when none is given.
        self.counters = counters or pool
        self.settler = throttle.Settler(self.counters)  # sign-in successes, coalesced under load
        self.passwords = passwords
        self.sealer = Sealer(settings.seal_keys.get_secret_value())
        self.topics = topics
        self.key = settings.hmac_key()
        from services.auth.two_factor import TwoFactor

        self.two_factor = TwoFactor(self, settings.two_factor_seal_keys.get_secret_value())

    # ------------------------------------------------------------------ accounts

    async def sign_up(self, email: str | None, username: str | None, password: str | None, address: str,
                      then: Callable[[store.Account], Awaitable[T]] | None = None) -> tuple[store.Account, T | None]:
        """Create an account. ``then`` (the first session's mint) runs inside the account's
        transaction: if it fails, the account is not created, so a retry succeeds."""
        # Every attempt counts against the address (before validation, so probing is not free).
        s = self.s
        scope = [(f"signup:addr:{address}", s.signups_per_address)]
        wait = await throttle.reserve(self.pool, scope, window=s.signup_window)
        throttle.refuse_if_waiting(wait, SignInThrottled, "Too many sign-ups", code="too_many_signups")
        await throttle.fail(self.pool, scope, window=s.signup_window, max_block=s.signup_window, growing=False)
        email = check_email(email)
        username = check_username(username)
        check_password(password, email=email, username=username)
        assert password is not None
        password_hash = await self.passwords.hash(password)
        account_id = uuid.uuid4()
        result: T | None = None
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    account = await store.insert_account(conn, account_id, email, normalise_email(email), username,
                                                         username.lower(), password_hash)
                    await events.publish(conn, self.topics.auth_events,
                                         AccountCreated(account_id=str(account_id), email=email, username=username),
                                         key=str(account_id))
                    if then is not None:
                        result = await then(account)
            except asyncpg.UniqueViolationError as exc:
                if "email" in (exc.constraint_name or ""):
                    raise EmailTaken(field="email") from None
                raise UsernameTaken(field="username") from None
        return account, result

    # ------------------------------------------------------------------ sign-in

    def _signin_scopes(self, account: store.Account | None, login_norm: str, address: str) -> list[tuple[str, int]]:
        """The account's budget (whichever login names it; the login string when no account has
        it, so both behave alike) and the address's budget."""
        s = self.s
        first = f"{_ACCOUNT_SCOPE}{account.id}" if account is not None else f"{_LOGIN_SCOPE}{login_norm}"
        return [(first, s.signin_free_failures_per_login),
                (f"signin:addr:{address}", s.signin_free_failures_per_address)]

    async def _reserve_login(self, login_norm: str, address: str, *, with_code: bool = False) -> Reserved:
        """Sign-in's account lookup and its reservation (see _signin_scopes) in one statement; with
        ``with_code`` (a one-time code came with the password), the code budget's place too."""
        s = self.s
        code = store.CodeBudget(TWO_FACTOR_ACCOUNT_SCOPE, f"{TWO_FACTOR_LOGIN_SCOPE}{login_norm}",
                                s.two_factor_free_failures, s.two_factor_window) if with_code else None
        reading = store.login_reading(login_norm, f"{_LOGIN_SCOPE}{login_norm}", _ACCOUNT_SCOPE,
                                      s.signin_free_failures_per_login, code)
        address_scope = (f"signin:addr:{address}", s.signin_free_failures_per_address)
        wait, row = await throttle.reserve_reading(self.counters, reading, [address_scope], window=s.signin_window)
        throttle.refuse_if_waiting(wait, SignInThrottled, "Too many failed attempts")
        scopes = [(row["names"][0], s.signin_free_failures_per_login), address_scope]
        if code is None:
            return Reserved(store.account_of(row), scopes)
        return Reserved(store.account_of(row), scopes, (row["names"][1], code.free), row["sealed_secret"])

    async def _reserve(self, scopes: list[tuple[str, int]]) -> None:
        """Reserve this attempt before hashing (atomically, in SQL): parallel guesses are held to the
        budget; settled by _failed or _succeeded."""
        wait = await throttle.reserve(self.counters, scopes, window=self.s.signin_window)
        throttle.refuse_if_waiting(wait, SignInThrottled, "Too many failed attempts")

    async def _failed(self, scopes: list[tuple[str, int]]) -> None:
        await throttle.fail(self.counters, scopes, window=self.s.signin_window, max_block=self.s.signin_max_block)

    async def _succeeded(self, scopes: list[tuple[str, int]], *, also: list[tuple[str, int]] | None = None) -> None:
        """A right password: the account's failures are forgiven, the address's reserved attempt
        taken back (and the places in ``also``)."""
        await self.settler.settle(scopes[0][0], scopes[1:] + (also or []))

    async def authenticate(self, login: str | None, password: str | None, address: str,
                           verification_code: str | None = None) -> store.Account:
        """Check credentials with throttling; raises BadCredentials, SignInThrottled, ResetRequired, and
        for an account with two-step verification TwoFactorRequired / WrongVerificationCode (1029)."""
        if not login or not password or len(login) > 254 or len(password) > MAX_PASSWORD:
            raise BadCredentials()
        login_norm = normalise_login(login)
        # A current TOTP code beside the password: its budget is reserved in the password's statement,
        # and a right code is used up in the settlement's (two statements in all, as without a code).
        totp = one_time_code(verification_code)
        account, scopes, code_scope, sealed = await self._reserve_login(login_norm, address, with_code=bool(totp))
        reserved = scopes + ([code_scope] if code_scope else [])
        result: VerifyResult | None = None
        try:
            if account is None:
                await self.passwords.verify_dummy(password)
            else:
                result = await self.passwords.verify(account.password_hash, password)
                # Old apps append the 6-digit code to the password: a second verify, within this reservation.
                if not result.ok and not verification_code:
                    password, verification_code, result = await self._appended_code(account, password, result)
        except BaseException:
            await throttle.release(self.counters, reserved)
            raise
        if account is None or result is None or not result.ok:
            await self._failed(scopes)
            if code_scope:  # a wrong password says nothing of the code: its place goes back uncounted
                await throttle.release(self.counters, [code_scope])
            raise BadCredentials()
        if account.two_factor_on and code_scope and sealed and totp:
            await self.two_factor.verify_reserved(account, totp, sealed, scopes, code_scope)
        else:
            await self._succeeded(scopes, also=[code_scope] if code_scope else None)
            if account.two_factor_on:
                await self.two_factor.verify(account, verification_code)
        if account.reset_required_at is not None:
            raise ResetRequired()
        if result.needs_rehash:
            await store.update_password_hash(self.pool, account.id, account.password_hash,
                                             await self.passwords.hash(password))
        return account

    async def _appended_code(self, account: store.Account, password: str, result: VerifyResult
                             ) -> tuple[str, str | None, VerifyResult]:
        """Old apps send the password with the 6-digit code appended: for a 2FA account whose whole
        password did not verify, try the password without its last 6 digits."""
        split = self.two_factor.split_appended(password)
        if split is None or not account.two_factor_on:
            return password, None, result
        retry = await self.passwords.verify(account.password_hash, split[0])
        return (split[0], split[1], retry) if retry.ok else (password, None, result)

    async def confirm_password(self, account: store.Account, password: str | None, address: str, *,
                               field: str = "password", wrong: str = "the password is wrong",
                               alongside: Callable[[], Awaitable[T]] | None = None) -> T | None:
        """The current password for a sensitive change, throttled like sign-in (the same reservations);
        a wrong one raises BadCredentials(``wrong``) on ``field``. ``alongside`` (a password change's
        hash of the new password) starts once the attempt is admitted and runs beside the verify, so
        the change waits for one argon2 time instead of two; its result is returned, and it is thrown
        away when the password is wrong. A refused attempt starts nothing, so throttled requests stay
        cheap, and admitted ones are held to the budget like sign-ins."""
        if not password or len(password) > MAX_PASSWORD:
            raise BadCredentials(wrong, field=field)
        scopes = self._signin_scopes(account, account.username.lower(), address)
        await self._reserve(scopes)
        extra = asyncio.ensure_future(alongside()) if alongside is not None else None
        try:
            ok = (await self.passwords.verify(account.password_hash, password)).ok
        except BaseException:
            _discard(extra)
            await throttle.release(self.counters, scopes)
            raise
        if not ok:
            _discard(extra)
            await self._failed(scopes)
            raise BadCredentials(wrong, field=field)
        await self._succeeded(scopes)
        return await extra if extra is not None else None

    # ------------------------------------------------------------------ reset by email

    async def request_reset(self, email: str | None, address: str) -> None:
        """Throttle by address and by email string; the caller answers 204 either way."""
        if not email or len(email) > 254:
            raise InvalidField("email is required", field="email")
        email_norm = normalise_email(email)
        s = self.s
        scopes = [f"reset:addr:{address}", f"reset:email:{email_norm}"]
        wait = await throttle.blocked_for(self.pool, scopes)
        throttle.refuse_if_waiting(wait, SignInThrottled, "Too many reset requests", code="too_many_reset_requests")
        await throttle.hit(self.pool, scopes[0], free=s.reset_requests_per_address, window=s.reset_window,
                                 max_block=s.reset_window)
        await throttle.hit(self.pool, scopes[1], free=s.reset_requests_per_email, window=s.reset_window,
                                 max_block=s.reset_window)

    async def send_reset(self, email: str) -> None:
        """Create a reset token and its sealed event, if the account exists (runs after the answer)."""
        account = await store.find_by_login(self.pool, normalise_email(email))
        if account is None:
            return
        # The account's own budget, whichever login form and address asked: the mailbox is not flooded.
        # It is counted after the answer, so the answer says nothing about it.
        hits = await throttle.hit(self.pool, f"reset:account:{account.id}", free=self.s.reset_emails_per_account,
                                  window=self.s.reset_window, max_block=self.s.reset_window, growing=False)
        if hits > self.s.reset_emails_per_account:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await self._issue_reset(conn, account)

    async def _issue_reset(self, conn: asyncpg.Connection, account: store.Account) -> None:
        token = tokens.new_token(tokens.RESET_TOKEN_BYTES)
        expires = utcnow() + timedelta(seconds=self.s.reset_token_ttl)
        await store.insert_reset_token(conn, tokens.digest(self.key, token, purpose="reset"), account.id, expires)
        event = PasswordResetRequested(
            account_id=str(account.id), email=account.email, username=account.username,
            sealed_token=self.sealer.seal(token, context=str(account.id)), reset_url=self.reset_url(),
            expires_at=iso(expires),
        )
        await events.publish(conn, self.topics.auth_events, event, key=str(account.id))

    def reset_url(self) -> str:
        return self.s.public_base_url.rstrip("/") + "/reset"

    async def reset_password(self, reset_token: str | None, password: str | None, sign_out: bool) -> Changed:
        """Redeem a reset token; returns the password.changed event."""
        done = await self._already_changed(None)
        if done is not None:
            return Changed(done)
        if not reset_token or len(reset_token) > 256:
            raise InvalidResetToken()
        token_hmac = tokens.digest(self.key, reset_token, purpose="reset")
        account_id = await store.peek_reset_token(self.pool, token_hmac)
        account = await store.find_by_id(self.pool, account_id) if account_id else None
        if account is None:
            raise InvalidResetToken()
        check_password(password, email=account.email, username=account.username)
        assert password is not None
        new_hash = await self.passwords.hash(password)
        async with self.pool.acquire() as conn, conn.transaction():
            if await store.consume_reset_token(conn, token_hmac) is None:
                raise InvalidResetToken()  # used concurrently, or expired meanwhile
            return await self._change(conn, account, new_hash, cause="reset", revoke=sign_out, keep=None)

    # ------------------------------------------------------------------ change while signed in

    async def change_password(self, account_id: uuid.UUID, session_id: str, current: str | None,
                              password: str | None, sign_out: bool, address: str) -> Changed:
        done = await self._already_changed(account_id)
        if done is not None:
            return Changed(done)
        account = await store.find_by_id(self.pool, account_id)
        if account is None:
            raise BadCredentials()
        check_password(password, email=account.email, username=account.username)
        assert password is not None
        new_hash = await self.confirm_password(account, current, address, field="currentPassword",
                                               wrong="the current password is wrong",
                                               alongside=lambda: self.passwords.hash(password))
        assert new_hash is not None
        async with self.pool.acquire() as conn, conn.transaction():
            return await self._change(conn, account, new_hash, cause="change", revoke=sign_out, keep=session_id)

    async def _change(self, conn: asyncpg.Connection, account: store.Account, new_hash: str, *, cause: str,
                      revoke: bool, keep: str | None) -> Changed:
        changed_at: datetime = await store.set_password(conn, account.id, new_hash)
        # A reset link asked for before the change is a credential of the old password: void it.
        await store.invalidate_reset_tokens(conn, account.id)
        env = await events.publish(
            conn, self.topics.auth_events,
            PasswordChanged(account_id=str(account.id), email=account.email, username=account.username, cause=cause,
                            revoke_sessions=revoke, keep_session_id=keep, changed_at=iso(changed_at)),
            key=str(account.id))
        rid = logs.request_id.get()
        if rid:
            await store.insert_change_request(conn, rid, account.id, env.id)
        return Changed(str(env.id), env)

    async def _already_changed(self, account_id: uuid.UUID | None) -> str | None:
        """The event id of the change this very request made already (the edge re-sent it after the
        replica that committed it died), or None. Request ids come from the edge, not the client; a
        signed-in change also has to be the same account's."""
        rid = logs.request_id.get()
        if not rid:
            return None
        done = await store.find_change_request(self.pool, rid)
        if done is None or (account_id is not None and done[0] != account_id):
            return None
        return str(done[1])

    # ------------------------------------------------------------------ reset required

    async def require_reset(self, account_id: uuid.UUID, *, reason: str, incident_id: str | None, notify: bool,
                            revoke_sessions: bool) -> bool:
        """Flag one account; with ``notify`` the event carries a sealed reset token for the email."""
        async with self.pool.acquire() as conn, conn.transaction():
            account = await store.find_by_id(conn, account_id)
            if account is None or not await store.flag_reset_required(conn, account_id, reason, incident_id):
                return False
            sealed = expires = None
            if notify:
                token = tokens.new_token(tokens.RESET_TOKEN_BYTES)
                exp = utcnow() + timedelta(seconds=self.s.reset_token_ttl)
                await store.insert_reset_token(conn, tokens.digest(self.key, token, purpose="reset"), account_id, exp,
                                               incident_id)
                sealed, expires = self.sealer.seal(token, context=str(account_id)), iso(exp)
            await events.publish(conn, self.topics.auth_events, AccountResetRequired(
                account_id=str(account_id), email=account.email, username=account.username, reason=reason,
                incident_id=incident_id, notify=notify, sealed_token=sealed,
                reset_url=self.reset_url() if notify else None, expires_at=expires), key=str(account_id))
            if revoke_sessions:
                await events.publish(conn, self.topics.auth_events, PasswordChanged(
                    account_id=str(account_id), email=account.email, username=account.username, cause="forced",
                    revoke_sessions=True, incident_id=incident_id, reason=reason, notify=False,
                    changed_at=iso(utcnow())), key=str(account_id))
        return True
