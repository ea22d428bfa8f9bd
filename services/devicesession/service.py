"""devicesession's domain logic: minting, introspection, revocation. No HTTP, no Kafka here:
events go through the outbox in the caller's transaction.

Invariants:
- A session token exists in plaintext only in the mint answer; the database has its HMAC.
- Every revocation that revoked at least one session publishes exactly one ``sessions.revoked``
  in the same transaction as the revocation, so holders hear of every revoked session.
- Revocation caused by an event is idempotent on that event (``revocations.causing_event_id``).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.devicesession import store
from services.devicesession.errors import InvalidMint
from shared import outbox, tokens
from shared.events import (
    DeviceRemoved,
    SessionsRevoked,
    envelope,
    iso,
    utcnow,
)

PRODUCER = "devicesession"
KINDS = ("player", "server", "browser", "controller", "app")
_TEXT_FIELDS = ("product", "version", "platform", "platform_version", "device", "device_name", "model", "vendor",
                "provides", "public_address")
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class Topics:
    """Topic names with the deployment's prefix."""

    sessions_revoked: str
    events: str


@dataclass(frozen=True)
class Minted:
    token: str
    session_id: uuid.UUID
    device_id: int
    device_uuid: uuid.UUID
    issued_at: datetime


def parse_mint(body: Any) -> tuple[uuid.UUID, dict[str, Any], bool]:
    """Validate a mint request; returns (account id, device fields, remember)."""
    if not isinstance(body, dict):
        raise InvalidMint("the body must be a JSON object")
    try:
        account_id = uuid.UUID(str(body.get("account_id")))
    except ValueError:
        raise InvalidMint("account_id must be a UUID", field="account_id") from None
    cid = body.get("client_identifier")
    if not isinstance(cid, str) or not _CLIENT_ID.match(cid):
        raise InvalidMint("client_identifier is required (1-255 printable characters)", field="client_identifier")
    kind = body.get("kind") or "player"
    if kind not in KINDS:
        raise InvalidMint(f"kind must be one of {', '.join(KINDS)}", field="kind")
    fields: dict[str, Any] = {"client_identifier": cid, "kind": kind}
    for name in _TEXT_FIELDS:
        value = body.get(name) or ""
        if not isinstance(value, str) or len(value) > 255:
            raise InvalidMint(f"{name} must be a string of at most 255 characters", field=name)
        fields[name] = value
    connections = body.get("connections") or []
    if not isinstance(connections, list) or len(connections) > 20:
        raise InvalidMint("connections must be a list of at most 20 entries", field="connections")
    clean = []
    for c in connections:
        if not isinstance(c, dict):
            raise InvalidMint("each connection must be an object", field="connections")
        try:
            port = int(c.get("port") or 0)
        except (TypeError, ValueError):
            raise InvalidMint("connection port must be an integer", field="connections") from None
        entry = {
            "protocol": str(c.get("protocol") or "http")[:10],
            "address": str(c.get("address") or "")[:255],
            "port": port,
            "uri": str(c.get("uri") or "")[:512],
            "local": bool(c.get("local", True)),
        }
        if not entry["uri"] and entry["address"]:
            entry["uri"] = f"{entry['protocol']}://{entry['address']}:{port}"
        clean.append(entry)
    fields["connections"] = clean
    if kind == "server" and not fields["provides"]:
        fields["provides"] = "server"
    remember = body.get("remember", True)
    if not isinstance(remember, bool):
        raise InvalidMint("remember must be a boolean", field="remember")
    return account_id, fields, remember


async def mint(conn: asyncpg.Connection | asyncpg.Pool, key: bytes, account_id: uuid.UUID, fields: dict[str, Any],
               *, remember: bool, short_ttl: int) -> Minted:
    """Create (or refresh) the device and a new session for it; only the token's HMAC is stored."""
    return (await mint_many(conn, key, [(account_id, fields, remember)], short_ttl=short_ttl))[0]


async def mint_many(conn: asyncpg.Connection | asyncpg.Pool, key: bytes,
                    requests: list[tuple[uuid.UUID, dict[str, Any], bool]], *, short_ttl: int) -> list[Minted]:
    """Mint a session for each parsed request (account id, device fields, remember), in order.

    One statement per round; a round holds each device at most once (two sign-ins from the same
    client identifier in one batch go in successive rounds), so a batch of distinct devices is one
    round trip."""
    rows = []
    for account_id, fields, remember in requests:
        expires = None if remember else utcnow() + timedelta(seconds=short_ttl)
        token = tokens.new_token(tokens.SESSION_TOKEN_BYTES)
        rows.append((token, store.MintRow(account_id, fields, uuid.uuid4(),
                                          tokens.digest(key, token, purpose="session"), expires)))
    minted: list[Minted | None] = [None] * len(rows)
    todo = list(range(len(rows)))
    while todo:
        seen: set[tuple[uuid.UUID, str]] = set()
        this_round: list[int] = []
        later: list[int] = []
        for n in todo:
            device_key = (rows[n][1].account_id, rows[n][1].fields["client_identifier"])
            (later if device_key in seen else this_round).append(n)
            seen.add(device_key)
        results = await store.mint_sessions(conn, [rows[n][1] for n in this_round])
        for n, (device, issued) in zip(this_round, results, strict=True):
            minted[n] = Minted(rows[n][0], rows[n][1].session_id, device.id, device.uuid, issued)
        todo = later
    return [m for m in minted if m is not None]


async def find_session(pool: asyncpg.Pool | asyncpg.Connection, key: bytes, token: str | None
                       ) -> store.SessionInfo | None:
    if not token or len(token) > 512:
        return None
    return await store.find_active_session(pool, tokens.digest(key, token, purpose="session"))


@dataclass(frozen=True)
class AccountSessions:
    """Every live session of one account, but ``except_session_id`` (the one that asked) if given."""

    account_id: uuid.UUID
    except_session_id: uuid.UUID | None = None
    # Only sessions created up to then: a password change revokes what was signed in before it,
    # never a sign-in with the new password that landed before its (delayed) event.
    issued_before: datetime | None = None


@dataclass(frozen=True)
class DeviceSessions:
    """Every live session of one device of one account."""

    account_id: uuid.UUID
    device_id: int


@dataclass(frozen=True)
class OneSession:
    """One session (sign-out of a token, a compensated mint)."""

    session_id: uuid.UUID


SessionSelector = AccountSessions | DeviceSessions | OneSession


@dataclass(frozen=True)
class Cause:
    """Why sessions are revoked. With ``event_id`` (the causing event) a revocation happens at most
    once per event: a redelivered event revokes nothing twice and publishes nothing."""

    name: str
    event_id: uuid.UUID | None = None
    incident_id: str | None = None


@dataclass(frozen=True)
class Revocation:
    revoked: int
    revocation_id: str | None  # None when nothing was revoked now

    @classmethod
    def none(cls) -> Revocation:
        return cls(0, None)


async def _handled_before(conn: asyncpg.Connection, cause: Cause) -> bool:
    return cause.event_id is not None and await store.find_revocation_by_cause(conn, cause.event_id) is not None


async def _record_and_publish(conn: asyncpg.Connection, topics: Topics, cause: Cause, *, account_id: uuid.UUID | None,
                              count: int, cutoff: datetime, event: SessionsRevoked | None) -> Revocation:
    revocation_id = uuid.UUID(event.revocation_id) if event else uuid.uuid4()
    recorded = await store.insert_revocation(
        conn, revocation_id, account_id=account_id, causing_event_id=cause.event_id, cause=cause.name,
        revoked=count, cutoff=cutoff, incident_id=cause.incident_id,
    )
    if not recorded or not count or event is None:
        return Revocation.none()  # handled before (its effects are committed already), or nothing to revoke
    await outbox.add(conn, topics.sessions_revoked, envelope(event, producer=PRODUCER, key=event.account_id))
    return Revocation(count, event.revocation_id)


async def revoke_sessions(conn: asyncpg.Connection, topics: Topics, selector: SessionSelector,
                          cause: Cause) -> Revocation:
    """Revoke the selected live sessions in one statement and publish one ``sessions.revoked``
    naming them, in one transaction (a savepoint inside the caller's, e.g. a consumer's)."""
    async with conn.transaction():
        if await _handled_before(conn, cause):
            return Revocation.none()  # revoking again would cut off sessions made since
        match selector:
            case AccountSessions(account_id=account, except_session_id=keep, issued_before=before):
                revoked, cutoff = await store.revoke_sessions(conn, reason=cause.name, account_id=account,
                                                              except_session_id=keep, issued_before=before)
            case DeviceSessions(account_id=account, device_id=device):
                revoked, cutoff = await store.revoke_sessions(conn, reason=cause.name, account_id=account,
                                                              device_id=device)
            case OneSession(session_id=sid):
                revoked, cutoff = await store.revoke_sessions(conn, reason=cause.name, session_ids=[sid])
        key_account = selector.account_id if not isinstance(selector, OneSession) else (
            revoked[0][1] if revoked else None)
        event = SessionsRevoked(
            revocation_id=str(uuid.uuid4()), account_id=str(key_account), session_ids=[str(s) for s, _ in revoked],
            cutoff=iso(cutoff), cause=cause.name,
            causing_event_id=str(cause.event_id) if cause.event_id else None,
        ) if revoked else None
        return await _record_and_publish(conn, topics, cause, account_id=key_account, count=len(revoked),
                                         cutoff=cutoff, event=event)


async def cut_off_accounts(conn: asyncpg.Connection, topics: Topics, account_ids: list[uuid.UUID], cause: Cause, *,
                           key: str) -> Revocation:
    """Bulk revocation (breach, admin): every session of these accounts created up to now is dead,
    recorded as one cutoff per account rather than a rewrite of each session row; one
    ``sessions.revoked`` naming the accounts, keyed by ``key`` (an incident id, say)."""
    async with conn.transaction():
        if await _handled_before(conn, cause):
            return Revocation.none()
        accounts, count, cutoff = await store.cut_off_accounts(conn, reason=cause.name, account_ids=account_ids)
        event = SessionsRevoked(
            revocation_id=str(uuid.uuid4()), account_id=key, session_ids=[], cutoff=iso(cutoff), cause=cause.name,
            causing_event_id=str(cause.event_id) if cause.event_id else None, all_sessions=True,
            account_ids=sorted(str(a) for a in accounts),
        ) if count else None
        return await _record_and_publish(conn, topics, cause, account_id=None, count=count, cutoff=cutoff,
                                         event=event)


async def remove_device(conn: asyncpg.Connection, topics: Topics, account_id: uuid.UUID, device_id: int
                        ) -> tuple[int, str | None] | None:
    """Sign a device out: revoke its sessions, hide it from lists, publish the events.
    Returns (sessions revoked, revocation id), or None when the account has no such device."""
    async with conn.transaction():
        device = await store.find_device(conn, account_id, device_id)
        if device is None:
            return None
        rev = await revoke_sessions(conn, topics, DeviceSessions(account_id, device_id), Cause("device_removed"))
        await store.mark_device_removed(conn, device_id)
        env = envelope(DeviceRemoved(account_id=str(account_id), device_id=str(device_id),
                                     client_identifier=device.client_identifier, name=device.device_name),
                       producer=PRODUCER, key=str(account_id))
        await outbox.add(conn, topics.events, env)
        return rev.revoked, rev.revocation_id


async def await_applied(pool: asyncpg.Pool, revocation_id: str | None, holders: frozenset[str],
                        wait_for: float, window: float) -> list[str]:
    """Wait until every instance of ``holders`` that may hold the revoked tokens in its cache (it
    asked about an active token within ``window`` seconds, its cache lifetime) has acknowledged
    ``revocation_id``, at most ``wait_for`` seconds. Returns the ``holder/instance`` pairs still
    missing (empty: every one applied it).

    This is what makes a sign-out read-your-writes: the caller answers "signed out" only once no
    instance of a Hearth service still has the token in its cache. It polls the database, not this
    process's memory: the acknowledgement may be consumed by another replica. An instance that died
    after introspecting costs a sign-out at most ``wait_for`` until ``window`` has passed."""
    if revocation_id is None or not holders or wait_for <= 0:
        return []
    rid = uuid.UUID(revocation_id)
    expected = await store.caching_instances(pool, sorted(holders), window)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_for
    delay = 0.002
    while expected:
        expected -= await store.acked_instances(pool, rid)
        if not expected or loop.time() >= deadline:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.025)
    return sorted(f"{h}/{i}" for h, i in expected)
