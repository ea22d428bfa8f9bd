"""devicesession's HTTP handlers: parse -> call service -> render."""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from aiohttp import web
from prometheus_client import Counter

from services.devicesession import service, store
from services.devicesession.errors import DeviceNotFound, HolderUnauthorized, InvalidMint, InvalidToken
from services.devicesession.settings import Settings
from shared import plex
from shared.app import POOL, SettingsOf, internal_only, json_object
from shared.consumer import apply_once
from shared.dispatch import EventHandlers
from shared.errors import NotFound, ValidationFailed
from shared.events import Envelope, PasswordChanged, decode_data
from shared.holder import holder_secret
from shared.tokens import same

log = logging.getLogger(__name__)
TOPICS = web.AppKey("topics", service.Topics)
# Per-process by design (issue 17): last-used times waiting for the batched write; a replica that
# dies loses at most TOUCH_INTERVAL seconds of "last seen", which decides nothing.
TOUCHES = web.AppKey("touches", dict)
MINT_POOL = web.AppKey("mint_pool", asyncpg.Pool)


@dataclasses.dataclass(frozen=True)
class Revoker:
    """The consumer of ``auth.events`` that turns password changes into revocations: its name (the
    processed-events marker) and handlers, shared with POST /internal/revocations/by-event."""

    consumer: str
    handlers: EventHandlers


REVOKER = web.AppKey("revoker", Revoker)
DIRECT = Counter("hearth_devicesession_handed_over_total",
                 "password.changed events auth handed over directly: applied by that call, or already by the consumer",
                 ["outcome"])


_settings = SettingsOf(Settings)


def _internal(request: web.Request) -> None:
    internal_only(request)


def _uuid(value: object, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ValidationFailed(f"{name} must be a UUID", field=name) from None


def _epoch(dt: datetime) -> int:
    return int(dt.timestamp())


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _touch(request: web.Request, info: store.SessionInfo) -> None:
    """Remember the use; the flusher writes batches (never a write per request)."""
    request.app[TOUCHES][info.session_id] = (info.device_id, datetime.now(UTC))


# --------------------------------------------------------------------------------- internal


def _minted(minted: service.Minted) -> dict[str, object]:
    return {"token": minted.token, "session_id": str(minted.session_id), "device_id": minted.device_id,
            "device_uuid": str(minted.device_uuid), "issued_at": minted.issued_at.isoformat()}


async def mint_session(request: web.Request) -> web.Response:
    _internal(request)
    account_id, fields, remember = service.parse_mint(await json_object(request))
    s = _settings(request)
    minted = await service.mint(request.app[MINT_POOL], s.hmac_key(), account_id, fields, remember=remember,
                                short_ttl=s.short_session_ttl)
    return web.json_response(_minted(minted), status=201)


MAX_BATCH = 64


async def mint_sessions(request: web.Request) -> web.Response:
    """Several mints in one call: ``{"sessions": [<mint request>, ...]}`` (1 to 64). Each item is
    validated alone: the answer's ``sessions`` holds, in order, the minted session or
    ``{"error": {"status", "code", "detail", "field"}}`` for an item that was refused."""
    _internal(request)
    body = await json_object(request)
    items = body.get("sessions")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise InvalidMint(f"sessions must be a list of 1 to {MAX_BATCH} mint requests", field="sessions")
    answers: list[dict[str, object]] = [{} for _ in items]
    valid: list[tuple[int, tuple[uuid.UUID, dict[str, object], bool]]] = []
    for n, item in enumerate(items):
        try:
            valid.append((n, service.parse_mint(item)))
        except InvalidMint as exc:
            answers[n] = {"error": {"status": exc.status, "code": exc.code, "detail": exc.detail, "field": exc.field}}
    if valid:
        s = _settings(request)
        minted = await service.mint_many(request.app[MINT_POOL], s.hmac_key(), [parsed for _, parsed in valid],
                                         short_ttl=s.short_session_ttl)
        for (n, _), m in zip(valid, minted, strict=True):
            answers[n] = _minted(m)
    request_ids = [str(i.get("request_id"))[:64] for i in items if isinstance(i, dict) and i.get("request_id")]
    log.info("minted a batch", extra={"items": len(items), "minted": len(valid), "request_ids": request_ids})
    return web.json_response({"sessions": answers})


def _cause(body: dict[str, object], default: str) -> service.Cause:
    incident = body.get("incident_id")
    return service.Cause(str(body.get("cause") or default)[:40], incident_id=str(incident)[:100] if incident else None)


async def revoke_sessions(request: web.Request) -> web.Response:
    """One of: ``token`` or ``session_id`` (that session), ``account_id`` with an optional
    ``except_session_id`` (all the account's others), or ``account_ids`` (bulk cutoff)."""
    _internal(request)
    body = await json_object(request)
    modes = [k for k in ("token", "session_id", "account_id", "account_ids") if k in body]
    if len(modes) != 1:
        raise InvalidMint("give exactly one of token, session_id, account_id or account_ids")
    mode = modes[0]
    topics = request.app[TOPICS]
    async with request.app[POOL].acquire() as conn:
        if mode == "account_ids":
            ids = body["account_ids"]
            if not isinstance(ids, list) or not ids or len(ids) > 10_000:
                raise InvalidMint("account_ids must be a list of 1 to 10000 UUIDs")
            accounts = [_uuid(a, "account_ids") for a in ids]
            rev = await service.cut_off_accounts(conn, topics, accounts, _cause(body, "admin"),
                                                 key=str(body.get("key") or ids[0])[:100])
            # A bulk (breach) revocation answers at once: nobody waits on the next request.
            return web.json_response({"revoked": rev.revoked, "revocation_id": rev.revocation_id,
                                      "not_applied_by": []})
        selector: service.SessionSelector
        if mode == "token":
            info = await service.find_session(conn, _settings(request).hmac_key(), str(body["token"]))
            if info is None:
                return web.json_response({"revoked": 0, "revocation_id": None, "not_applied_by": []})
            selector, default = service.OneSession(info.session_id), "signout"
        elif mode == "session_id":
            selector, default = service.OneSession(_uuid(body["session_id"], "session_id")), "signout"
        else:
            keep = _uuid(body["except_session_id"], "except_session_id") if body.get("except_session_id") else None
            selector, default = service.AccountSessions(_uuid(body["account_id"], "account_id"), keep), "signout_all"
        rev = await service.revoke_sessions(conn, topics, selector, _cause(body, default))
    # Committed. A sign-out answers once Hearth's own holders have applied it, so the next request
    # to any Hearth service is refused.
    missing = await _await_applied(request, rev.revocation_id)
    return web.json_response({"revoked": rev.revoked, "revocation_id": rev.revocation_id, "not_applied_by": missing})


async def _await_applied(request: web.Request, revocation_id: str | None) -> list[str]:
    s = _settings(request)
    return await service.await_applied(request.app[POOL], revocation_id, s.wait_holders(), s.applied_wait,
                                       s.applied_wait_window)


async def list_account_devices(request: web.Request) -> web.Response:
    _internal(request)
    account_id = _uuid(request.match_info["account_id"], "account_id")
    current = request.query.get("session_id")
    current_device = None
    async with request.app[POOL].acquire() as conn:
        if current:
            row = await conn.fetchrow("SELECT device_id FROM sessions WHERE id = $1 AND account_id = $2",
                                      _uuid(current, "session_id"), account_id)
            current_device = row["device_id"] if row else None
        devices = await store.list_devices(conn, account_id)
    return web.json_response({"devices": [
        {"id": d.device.id, "client_identifier": d.device.client_identifier, "name": d.device.device_name,
         "product": d.device.product, "version": d.device.version, "platform": d.device.platform,
         "platform_version": d.device.platform_version, "device": d.device.device, "kind": d.device.kind,
         "provides": d.device.provides, "created_at": d.device.created_at.isoformat(),
         "last_seen_at": d.device.last_seen_at.isoformat(), "active_sessions": d.active_sessions,
         "current": d.device.id == current_device}
        for d in devices
    ]})


async def remove_account_device(request: web.Request) -> web.Response:
    _internal(request)
    account_id = _uuid(request.match_info["account_id"], "account_id")
    device_id = _device_id(request.match_info["device_id"])
    async with request.app[POOL].acquire() as conn:
        removed = await service.remove_device(conn, request.app[TOPICS], account_id, device_id)
    if removed is None:
        raise DeviceNotFound()
    n, rid = removed
    missing = await _await_applied(request, rid)
    return web.json_response({"revoked": n, "revocation_id": rid, "not_applied_by": missing})


async def revoke_for_event(request: web.Request) -> web.Response:
    """auth hands over the ``password.changed`` envelope it has just committed, so that the sign-out
    need not wait for the event's trip through Kafka: it is applied here by the consumer's own
    handler under the consumer's processed-events marker, so whichever comes second (this call or
    the consumed copy) does nothing. Answers like a revoke, once Hearth's own holders applied it."""
    _internal(request)
    try:
        env = Envelope.decode(await request.read())
        if env.type != PasswordChanged.TYPE:
            raise ValueError(f"not a {PasswordChanged.TYPE} event")
        event = decode_data(env, PasswordChanged)
        uuid.UUID(event.account_id)
        if event.keep_session_id:
            uuid.UUID(event.keep_session_id)
    except (ValueError, TypeError) as exc:  # checked before anything is written
        raise InvalidMint(f"the body must be a {PasswordChanged.TYPE} event envelope ({exc})"[:300]) from None
    revoker = request.app[REVOKER]
    fresh = await apply_once(request.app[POOL], revoker.consumer, revoker.handlers, env)
    DIRECT.labels("applied" if fresh else "already").inc()
    row = await store.find_revocation_by_cause(request.app[POOL], env.id)
    if row is None or not row["revoked"]:
        return web.json_response({"revoked": 0, "revocation_id": str(row["id"]) if row else None,
                                  "not_applied_by": []})
    missing = await _await_applied(request, str(row["id"]))
    return web.json_response({"revoked": row["revoked"], "revocation_id": str(row["id"]), "not_applied_by": missing})


async def revocation_outcome(request: web.Request) -> web.Response:
    _internal(request)
    cause = _uuid(request.query.get("causing_event_id"), "causing_event_id")
    row = await store.find_revocation_by_cause(request.app[POOL], cause)
    if row is None:
        raise NotFound("not processed yet")
    return web.json_response({"revocation_id": str(row["id"]), "revoked": row["revoked"], "cause": row["cause"],
                              "created_at": row["created_at"].isoformat()})


async def await_revocation_applied(request: web.Request) -> web.Response:
    """Answer once Hearth's own holders have applied the revocation (or the wait ran out)."""
    _internal(request)
    rid = str(_uuid(request.match_info["revocation_id"], "revocation_id"))
    return web.json_response({"revocation_id": rid, "not_applied_by": await _await_applied(request, rid)})


async def revocation_acks(request: web.Request) -> web.Response:
    _internal(request)
    rid = _uuid(request.match_info["revocation_id"], "revocation_id")
    pool = request.app[POOL]
    acks = await store.revocation_acks(pool, rid)
    holders = await store.holder_ids(pool)
    created = await pool.fetchval("SELECT created_at FROM revocations WHERE id = $1", rid)
    alive = await store.expected_instances(pool, created) if created is not None else {}
    applied = {(a["holder_id"], a["instance_id"]) for a in acks}
    return web.json_response({
        "revocation_id": str(rid),
        "acks": [{"holder_id": a["holder_id"], "instance_id": a["instance_id"],
                  "applied_at": a["applied_at"].isoformat()} for a in acks],
        "holders": holders,
        "missing": sorted(set(holders) - {a["holder_id"] for a in acks}),
        # Instances alive across the revocation (acknowledged before and after it) that did not apply it.
        "missing_instances": sorted({f"{h}/{i}" for h, insts in alive.items() for i in insts} -
                                    {f"{h}/{i}" for h, i in applied}),
    })


async def incident_revocations(request: web.Request) -> web.Response:
    _internal(request)
    return web.json_response(await store.incident_revocations(request.app[POOL],
                                                              request.match_info["incident_id"][:100]))


# --------------------------------------------------------------------------------- RFC 7662


async def introspect(request: web.Request) -> web.Response:
    s = _settings(request)
    holder = _holder(request, s)
    token = await plex.field(request, "token", max_len=512)
    info = await service.find_session(request.app[POOL], s.hmac_key(), token)
    if info is None:
        return web.json_response({"active": False})
    _touch(request, info)
    seen = request.app[HOLDERS_SEEN]
    if holder not in seen:
        seen.add(holder)
        await store.record_holder(request.app[POOL], holder)
    await _record_instance(request, holder)
    return web.json_response({
        "active": True, "sub": str(info.account_id), "account_id": str(info.account_id),
        "session_id": str(info.session_id), "device_id": info.device_id, "client_id": info.client_identifier,
        "kind": info.kind, "iat": _epoch(info.created_at), "token_type": "access_token",
        **({"exp": _epoch(info.expires_at)} if info.expires_at else {}),
    })


# Per-process by design: only saves re-recording a holder this replica already recorded.
HOLDERS_SEEN = web.AppKey("holders_seen", set)
# Per-process by design too: when this replica last recorded each instance's introspection. Each
# replica records an instance at most every INSTANCE_RECORD_EVERY seconds, so the table is at most
# that stale, which the wait window (APPLIED_WAIT_WINDOW) allows for.
INSTANCES_RECORDED = web.AppKey("instances_recorded", dict)
INSTANCE_RECORD_EVERY = 5.0
_INSTANCE = re.compile(r"[A-Za-z0-9._:@-]{1,200}")


async def _record_instance(request: web.Request, holder: str) -> None:
    instance = request.headers.get("X-Hearth-Instance", "")
    if not _INSTANCE.fullmatch(instance):
        return
    recorded: dict[tuple[str, str], float] = request.app[INSTANCES_RECORDED]
    now = time.monotonic()
    if now - recorded.get((holder, instance), float("-inf")) < INSTANCE_RECORD_EVERY:
        return
    recorded[(holder, instance)] = now
    if len(recorded) > 10_000:
        recorded.clear()
    await store.record_introspection(request.app[POOL], holder, instance)


def _holder(request: web.Request, s: Settings) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise HolderUnauthorized()
    try:
        holder_id, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise HolderUnauthorized() from None
    if not holder_id or len(holder_id) > 200:
        raise HolderUnauthorized()
    expected = holder_secret(s.holder_secret.get_secret_value(), holder_id)
    if not same(secret, expected):
        raise HolderUnauthorized()
    return holder_id


# --------------------------------------------------------------------------------- Plex devices


async def _account(request: web.Request) -> store.SessionInfo:
    token = await plex.param(request, "X-Plex-Token")
    info = await service.find_session(request.app[POOL], _settings(request).hmac_key(), token)
    if info is None:
        raise InvalidToken()
    _touch(request, info)
    return info


def _device_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise DeviceNotFound()
    return int(raw)


async def list_devices(request: web.Request) -> web.Response:
    info = await _account(request)
    devices = await store.list_devices(request.app[POOL], info.account_id)
    # Plex lists each device's token; Hearth stores only HMACs, so a device shows the token only to
    # itself (the caller's own session); other devices show an empty token.
    xml_children = []
    json_items = []
    for d in devices:
        dev = d.device
        token = (await plex.param(request, "X-Plex-Token") or "") if dev.id == info.device_id else ""
        attrs = {
            "name": dev.device_name or dev.product, "publicAddress": dev.public_address, "product": dev.product,
            "productVersion": dev.version, "platform": dev.platform, "platformVersion": dev.platform_version,
            "device": dev.device, "model": dev.model, "vendor": dev.vendor, "provides": dev.provides,
            "clientIdentifier": dev.client_identifier, "version": dev.version, "id": dev.id, "token": token,
            "createdAt": _epoch(dev.created_at), "lastSeenAt": _epoch(dev.last_seen_at), "screenResolution": "",
            "screenDensity": "",
        }
        conns = [plex.element("Connection", {"uri": c.get("uri", "")}) for c in dev.connections]
        xml_children.append(plex.element("Device", attrs, *conns))
        json_items.append({**attrs, "connections": [{"uri": c.get("uri", "")} for c in dev.connections]})
    return plex.respond(request, xml=plex.element("MediaContainer", {"size": len(devices)}, *xml_children),
                        json={"MediaContainer": {"size": len(devices), "Device": json_items}})


async def delete_device(request: web.Request) -> web.Response:
    info = await _account(request)
    device_id = _device_id(request.match_info["device_id"])
    async with request.app[POOL].acquire() as conn:
        removed = await service.remove_device(conn, request.app[TOPICS], info.account_id, device_id)
    if removed is None:
        raise DeviceNotFound()
    await _await_applied(request, removed[1])
    return web.Response(status=204)


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/internal/sessions", mint_session)
    r.add_post("/internal/sessions/batch", mint_sessions)
    r.add_post("/internal/sessions/revoke", revoke_sessions)
    r.add_get("/internal/accounts/{account_id}/devices", list_account_devices)
    r.add_delete("/internal/accounts/{account_id}/devices/{device_id}", remove_account_device)
    r.add_get("/internal/revocations", revocation_outcome)
    r.add_post("/internal/revocations/by-event", revoke_for_event)
    r.add_get("/internal/revocations/{revocation_id}/acks", revocation_acks)
    r.add_post("/internal/revocations/{revocation_id}/applied", await_revocation_applied)
    r.add_get("/internal/incidents/{incident_id}/revocations", incident_revocations)
    r.add_post("/oauth/introspect", introspect)
    r.add_get("/devices.xml", list_devices)
    r.add_get("/devices.json", list_devices)
    r.add_get("/devices", list_devices)
    r.add_delete("/devices/{device_id}.xml", delete_device)
    r.add_delete("/devices/{device_id}.json", delete_device)
    r.add_delete("/devices/{device_id}", delete_device)
    from services.devicesession import resources

    resources.setup_routes(app)  # /api/v2/resources, /api/resources, PUT /devices/{clientIdentifier}
