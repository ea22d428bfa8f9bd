"""linkcode's domain logic: Plex PINs, RFC 8628 device codes, server claim tokens. No HTTP here.

Invariants:
- Codes and tokens at rest are HMACs; a session token minted for a PIN or device code is sealed
  until its one collection, then erased; a revocation covering it erases it first (never delivered).
- Unknown, expired and used codes answer alike; every wrong entry counts against the account's
  budget (RFC 8628 section 5.1), and an exhausted budget refuses further entries until the window ends.
- A 4-character code is unique among live PINs; when the space is full, creation fails clearly.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.linkcode import store
from services.linkcode.errors import (
    AccessDenied,
    AuthorizationPending,
    ClientMismatch,
    CodeBudgetExhausted,
    CodeNotFound,
    CodeSpaceFull,
    CreationThrottled,
    ExpiredToken,
    InvalidClaim,
    InvalidGrant,
    SlowDown,
    UnsupportedGrant,
)
from services.linkcode.settings import Settings
from shared import outbox, throttle, tokens
from shared.crypto import Sealer, SealError
from shared.errors import Unavailable, ValidationFailed
from shared.events import (
    DeviceCodeApproved,
    Event,
    PinLinked,
    ServerClaimed,
    SessionsRevoked,
    envelope,
    iso,
    parse_time,
    utcnow,
)
from shared.holder import HolderKit, Principal
from shared.internal import InternalClient
from shared.plex import ClientInfo

PRODUCER = "linkcode"
PIN_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 section 6.1
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_CLIENT = re.compile(r"^[\x21-\x7e]{1,255}$")


def normalise_code(raw: str | None) -> str:
    return re.sub(r"[\s-]", "", (raw or "").upper())[:64]


def format_user_code(code: str) -> str:
    return f"{code[:4]}-{code[4:]}"


@dataclass(frozen=True)
class CreatedPin:
    pin: store.Pin
    code: str


@dataclass(frozen=True)
class CodeInfo:
    kind: str  # "pin" or "device_code"
    product: str
    device_name: str
    platform: str
    client: str
    expires_at: datetime


class LinkCodes:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, devicesession: InternalClient, auth: InternalClient,
                 topic: str) -> None:
        self.s = settings
        self.pool = pool
        self.devicesession = devicesession
        self.auth = auth
        self.topic = topic
        self.key = settings.hmac_key()
        self.sealer = Sealer(settings.linkcode_seal_keys.get_secret_value())
        self.kit: HolderKit | None = None  # set once the holder kit runs (see app.py)

    def _hmac(self, code: str, purpose: str) -> bytes:
        return tokens.digest(self.key, code, purpose=purpose)

    # ------------------------------------------------------------------ creation limits

    async def _limit_creation(self, address: str, client: str) -> None:
        s = self.s
        scopes = [f"create:addr:{address}", f"create:client:{client}"]
        wait = await throttle.blocked_for(self.pool, scopes)
        throttle.refuse_if_waiting(wait, CreationThrottled, "Too many codes requested")
        await throttle.hit(self.pool, scopes[0], free=s.create_per_address, window=s.create_window,
                           max_block=s.create_window, growing=False)
        await throttle.hit(self.pool, scopes[1], free=s.create_per_client, window=s.create_window,
                           max_block=s.create_window, growing=False)

    # ------------------------------------------------------------------ Plex PINs

    async def create_pin(self, info: ClientInfo, strong: bool, address: str) -> CreatedPin:
        if not info.client_identifier or not _CLIENT.match(info.client_identifier):
            from shared.errors import MissingClientIdentifier

            raise MissingClientIdentifier()
        await self._limit_creation(address, info.client_identifier)
        device = {k: v or "" for k, v in info.as_dict().items() if k != "client_identifier"}
        async with self.pool.acquire() as conn:
            if strong:
                code = tokens.random_code(PIN_ALPHABET, self.s.strong_code_length)
                pin = await store.insert_pin(conn, self._hmac(code, "pin"), True, info.client_identifier, device,
                                             self.s.pin_ttl)
                assert pin is not None
                return CreatedPin(pin, code)
            return await self._allocate_short(conn, info.client_identifier, device)

    async def _allocate_short(self, conn: asyncpg.Connection, client: str, device: dict[str, Any],
                              *, length: int = 4, alphabet: str = PIN_ALPHABET) -> CreatedPin:
        """Draw candidates in bulk, skip live ones in one query, insert the first free one. The
        first draw is small (at 90% occupancy 8 candidates are all taken 43% of the time) and each
        further draw four times larger, up to 256: a PIN costs a few HMACs while the code space is
        mostly free, and still a handful of queries when it is nearly full."""
        capacity = len(alphabet) ** length
        draw = 8
        for _ in range(20):
            full_draw = draw >= 256
            candidates = list({tokens.random_code(alphabet, length) for _ in range(min(draw, capacity))})
            draw = min(256, draw * 4)
            hmacs = {c: self._hmac(c, "pin") for c in candidates}
            taken = await store.taken_codes(conn, list(hmacs.values()))
            for code in candidates:
                if hmacs[code] in taken:
                    continue
                pin = await store.insert_pin(conn, hmacs[code], False, client, device, self.s.pin_ttl)
                if pin is not None:
                    return CreatedPin(pin, code)
            # Counting the live PINs is slow when the space is nearly full: only after a full draw found none.
            if full_draw and await store.live_short_pins(conn) >= capacity:
                break
        raise CodeSpaceFull()

    async def collect_pin(self, pin_id: int, client: str | None) -> tuple[store.Pin, str | None]:
        """The PIN and, once linked, its token (delivered once, then erased). Unknown, expired,
        collected, revoked and other clients' PINs all answer 'not found'."""
        found = await store.find_pin(self.pool, pin_id)
        if found is None or not client or found[0].client_identifier != client:
            raise CodeNotFound()
        pin, waiting, finished = found
        if finished:
            raise CodeNotFound()
        if not waiting:
            return pin, None
        async with self.pool.acquire() as conn:
            taken = await store.collect_pin(conn, pin_id, client)
        if taken is None:
            raise CodeNotFound()
        token = self._open(taken[0], f"pin:{pin_id}")
        if token is None or await self._validate(token) is None:
            raise CodeNotFound()  # revoked between link and collection: never delivered
        return pin, token

    async def _validate(self, token: str) -> Principal | None:
        assert self.kit is not None
        return await self.kit.validate(token)

    def _open(self, sealed: str, context: str) -> str | None:
        try:
            return self.sealer.open(sealed, context=context)
        except SealError:
            return None

    # ------------------------------------------------------------------ entering a code (link page, PUT link)

    def _code_scopes(self, account_id: str, address: str) -> list[tuple[str, int]]:
        s = self.s
        return [(f"link:account:{account_id}", s.code_attempts), (f"link:addr:{address}", s.code_attempts_per_address)]

    async def _budget(self, account_id: str, address: str) -> list[tuple[str, int]]:
        """Reserve one code entry from the account's and the address's budgets before looking the
        code up (atomic, so parallel guesses are held to the budget); a right code gives it back."""
        scopes = self._code_scopes(account_id, address)
        wait = await throttle.reserve(self.pool, scopes, window=self.s.code_attempt_window)
        throttle.refuse_if_waiting(wait, CodeBudgetExhausted, "Too many wrong codes")
        return scopes

    async def _right(self, scopes: list[tuple[str, int]]) -> None:
        await throttle.release(self.pool, scopes)

    async def _wrong(self, scopes: list[tuple[str, int]]) -> None:
        await throttle.fail(self.pool, scopes, window=self.s.code_attempt_window,
                            max_block=self.s.code_attempt_window, growing=False)

    async def _lookup(self, raw: str | None, scopes: list[tuple[str, int]], *, strong_only: bool = False
                      ) -> tuple[str, Any]:
        """The code's PIN or device code, settling the reserved entry: a wrong code counts (with
        ``strong_only``, anything but a strong PIN is a wrong code)."""
        try:
            found = await self._find(normalise_code(raw))
        except BaseException:
            await self._right(scopes)
            raise
        if found is None or (strong_only and (found[0] != "pin" or not found[1].strong)):
            await self._wrong(scopes)
            raise CodeNotFound()
        await self._right(scopes)
        return found

    async def _find(self, code: str) -> tuple[str, Any] | None:
        if len(code) == 8 and all(c in USER_CODE_ALPHABET for c in code):
            row = await store.find_pending_user_code(self.pool, self._hmac(code, "user_code"))
            return ("device_code", row) if row else None
        if len(code) in (4, self.s.strong_code_length) and all(c in PIN_ALPHABET for c in code):
            pin = await store.find_live_pin_by_code(self.pool, self._hmac(code, "pin"))
            return ("pin", pin) if pin else None
        return None

    async def _find_for(self, raw: str | None, account_id: str, address: str, client: str | None
                        ) -> tuple[str, Any]:
        """The live code, settling the entry reserved from the account's and the address's budgets
        (a wrong code counts). With ``client`` (the auth app's ``clientID``) only a strong PIN is
        accepted, and only one created by that client identifier."""
        scopes = await self._budget(account_id, address)
        kind, obj = await self._lookup(raw, scopes, strong_only=client is not None)
        if client is not None and not tokens.same(obj.client_identifier, client):
            raise ClientMismatch()
        return kind, obj

    async def describe(self, raw: str | None, account_id: str, address: str, *,
                       client: str | None = None) -> CodeInfo:
        """What would be linked (for the link page), counting a wrong entry against the budgets."""
        kind, obj = await self._find_for(raw, account_id, address, client)
        if kind == "pin":
            d = obj.device
            return CodeInfo("pin", d.get("product", ""), d.get("device_name", "") or d.get("device", ""),
                            d.get("platform", ""), obj.client_identifier, obj.expires_at)
        return CodeInfo("device_code", obj["client_id"], obj["client_id"], "", obj["client_id"], obj["expires_at"])

    async def approve(self, raw: str | None, principal: Principal, address: str, *, deny: bool = False,
                      client: str | None = None) -> str:
        """Link a PIN or approve (or deny) a device code for the signed-in account; with ``client``,
        only a strong PIN of that client identifier (the auth app)."""
        account_id = principal.account_id
        kind, obj = await self._find_for(raw, account_id, address, client)
        acct = uuid.UUID(account_id)
        if kind == "device_code":
            if deny:
                async with self.pool.acquire() as conn:
                    if not await store.deny_device_code(conn, obj["id"], acct):
                        raise CodeNotFound()
                return kind
            client_id = obj["client_id"]
            await self._mint_and_bind(
                acct, {"client_identifier": f"oauth:{client_id}"[:255], "product": client_id, "device_name": client_id},
                f"device_code:{obj['id']}",
                lambda conn, session_id, sealed: store.approve_device_code(conn, obj["id"], acct, session_id, sealed),
                lambda minted: DeviceCodeApproved(account_id=account_id, client_id=client_id, device_name=client_id,
                                                  approved_at=iso(utcnow())))
            return kind
        pin: store.Pin = obj
        if deny and client is None:
            raise ValidationFailed("PINs cannot be denied; let them expire")
        if deny:  # the auth app's Deny: the app's poller learns at once (404) instead of at expiry
            if not await store.end_pin(self.pool, pin.id):
                raise CodeNotFound()
            return kind
        d = pin.device
        await self._mint_and_bind(
            acct, {"client_identifier": pin.client_identifier, **d}, f"pin:{pin.id}",
            lambda conn, session_id, sealed: store.link_pin(conn, pin.id, acct, session_id, sealed),
            lambda minted: PinLinked(account_id=account_id, device_id=str(minted["device_id"]),
                                     client_identifier=pin.client_identifier, product=d.get("product", ""),
                                     device_name=d.get("device_name", "") or d.get("device", ""),
                                     platform=d.get("platform", ""), linked_at=iso(utcnow())))
        return kind

    async def _mint_and_bind(self, account_id: uuid.UUID, device: dict[str, Any], context: str,
                             bind: Callable[[asyncpg.Connection, uuid.UUID, str], Awaitable[bool]],
                             event: Callable[[dict[str, Any]], Event]) -> None:
        """Mint a session for ``device`` and bind it, its token sealed under ``context``, to a code:
        ``bind`` stores the session and the sealed token on the code (false when the code was taken
        meanwhile), in one transaction with ``event``. The session exists only bound to its code: if
        the code is gone or anything after the mint fails, it is revoked again (a gone code answers
        'not found'), so a failed approval leaves no live session behind and the code stays usable."""
        async with self._minted(account_id, device) as minted, self.pool.acquire() as conn, conn.transaction():
            sealed = self.sealer.seal(minted["token"], context=context)
            if not await bind(conn, uuid.UUID(minted["session_id"]), sealed):
                raise CodeNotFound()
            await outbox.add(conn, self.topic, envelope(event(minted), producer=PRODUCER, key=str(account_id)))

    @contextlib.asynccontextmanager
    async def _minted(self, account_id: uuid.UUID, device: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A session minted for ``device`` by devicesession, revoked again if the block fails (what
        it was minted for did not happen, so it must not stay live)."""
        minted = await self._mint(account_id, device)
        try:
            yield minted
        except BaseException:
            with contextlib.suppress(Exception):
                await self._revoke(minted)
            raise

    async def _mint(self, account_id: uuid.UUID, device: dict[str, Any]) -> dict[str, Any]:
        provides = str(device.get("provides") or "")
        kind = "server" if "server" in provides else "player" if "player" in provides else "app"
        body = {"account_id": str(account_id), "kind": kind, "remember": True,
                **{k: str(device.get(k) or "") for k in (
                    "client_identifier", "product", "version", "platform", "platform_version", "device",
                    "device_name", "model", "vendor", "provides")}}
        result: dict[str, Any] = await self.devicesession.call("POST", "/internal/sessions", body)
        return result

    async def _revoke(self, minted: dict[str, Any]) -> None:
        await self.devicesession.call("POST", "/internal/sessions/revoke", {"session_id": minted["session_id"]})

    # ------------------------------------------------------------------ RFC 8628

    async def device_authorization(self, client_id: str | None, scope: str | None, address: str) -> dict[str, Any]:
        if not client_id or not _CLIENT.match(client_id):
            raise ValidationFailed("client_id is required", code="invalid_request")
        if scope is not None and len(scope) > 200:
            raise ValidationFailed("scope is too long", code="invalid_scope")
        await self._limit_creation(address, f"oauth:{client_id}")
        base = self.s.public_base_url.rstrip("/")
        async with self.pool.acquire() as conn:
            for _ in range(10):
                device_code = tokens.new_token(32)
                user_code = tokens.random_code(USER_CODE_ALPHABET, 8)
                if await store.insert_device_code(conn, self._hmac(device_code, "device_code"),
                                                  self._hmac(user_code, "user_code"), client_id, scope or "",
                                                  self.s.device_code_interval, self.s.device_code_ttl):
                    shown = format_user_code(user_code)
                    return {"device_code": device_code, "user_code": shown, "verification_uri": base + "/link",
                            "verification_uri_complete": f"{base}/link?code={shown}",
                            "expires_in": self.s.device_code_ttl, "interval": self.s.device_code_interval}
        raise CodeSpaceFull()

    async def token(self, grant_type: str | None, device_code: str | None, client_id: str | None) -> dict[str, Any]:
        if grant_type != DEVICE_CODE_GRANT:
            raise UnsupportedGrant()
        if not device_code or not client_id or len(device_code) > 256:
            raise InvalidGrant()
        async with self.pool.acquire() as conn, conn.transaction():
            row = await store.poll_device_code(conn, self._hmac(device_code, "device_code"), client_id)
            if row is None:
                raise InvalidGrant()
            if not row["live"]:
                raise ExpiredToken()
            if row["status"] == "denied":
                raise AccessDenied()
            if row["status"] == "done":
                raise InvalidGrant()
            if row["status"] == "approved":
                sealed = await store.finish_device_code(conn, row["id"])
                token = self._open(sealed, f"device_code:{row['id']}") if sealed else None
                if token is None or await self._validate(token) is None:
                    raise AccessDenied("the approval was revoked")
                return {"access_token": token, "token_type": "Bearer", "scope": ""}
            too_fast = row["last_poll_at"] is not None and row["poll_interval"] > row["old_interval"]
        if too_fast:
            raise SlowDown(f"poll at most every {row['poll_interval']} seconds")
        raise AuthorizationPending()

    # ------------------------------------------------------------------ server claim

    async def claim_token(self, principal: Principal, session_token: str) -> str:
        """A claim token of the signed-in session: it records the session (its token sealed until the
        exchange), so revoking the session voids the claim."""
        token = "claim-" + tokens.new_token(18)
        token_hmac = self._hmac(token, "claim")
        sealed = self.sealer.seal(session_token, context=f"claim:{token_hmac.hex()}")
        await store.insert_claim(self.pool, token_hmac, uuid.UUID(principal.account_id),
                                 uuid.UUID(principal.session_id), sealed, self.s.claim_ttl)
        return token

    async def exchange_claim(self, token: str | None, info: ClientInfo, address: str) -> tuple[dict[str, Any], str]:
        """Redeem a claim token for a server session. All or nothing: the token is used up only in
        the transaction that also has the session minted and the account read; if either call
        fails, the token stays usable (and a session minted meanwhile is revoked)."""
        if not info.client_identifier or not _CLIENT.match(info.client_identifier):
            from shared.errors import MissingClientIdentifier

            raise MissingClientIdentifier()
        if not token or not token.startswith("claim-") or len(token) > 100:
            raise InvalidClaim()
        token_hmac = self._hmac(token, "claim")
        device = {k: v or "" for k, v in info.as_dict().items()}
        device["provides"] = device.get("provides") or "server"
        if "server" not in device["provides"]:
            device["provides"] = "server," + device["provides"]
        async with self.pool.acquire() as conn, conn.transaction():
            row = await store.lock_claim(conn, token_hmac)
            if row is None or row["sealed_session"] is None:
                raise InvalidClaim()
            # The session that asked for the claim must still be live, asked of devicesession itself
            # (not a cache that a just-committed revocation may not have reached yet).
            session_token = self._open(row["sealed_session"], f"claim:{token_hmac.hex()}")
            if session_token is None or await self._introspect(session_token) is None:
                raise InvalidClaim()
            account_id: uuid.UUID = row["account_id"]
            async with self._minted(account_id, {**device, "public_address": address}) as minted:
                account = await self.auth.call("GET", f"/internal/accounts/{account_id}")
                await store.use_claim(conn, token_hmac)
                await outbox.add(conn, self.topic, envelope(
                    ServerClaimed(account_id=str(account_id), device_id=str(minted["device_id"]),
                                  client_identifier=info.client_identifier,
                                  name=info.device_name or info.device or info.product or "server",
                                  platform=info.platform or "", claimed_at=iso(utcnow())),
                    producer=PRODUCER, key=str(account_id)))
        return account, str(minted["token"])

    async def _introspect(self, token: str) -> Principal | None:
        assert self.kit is not None
        try:
            return await self.kit.introspect(token)
        except Exception as exc:
            raise Unavailable("devicesession could not be asked") from exc

    # ------------------------------------------------------------------ revocations (holder role)

    async def on_revocation(self, rev: SessionsRevoked, conn: Any) -> None:
        """Erase the uncollected tokens a revocation covers (run once per revocation by the
        ``linkcode.revocations`` group, inside its processed-events transaction)."""
        sessions = [uuid.UUID(s) for s in rev.session_ids]
        accounts = [uuid.UUID(a) for a in (rev.account_ids or ([rev.account_id] if rev.all_sessions else []))]
        await store.erase_revoked(conn, sessions, accounts, parse_time(rev.cutoff))
