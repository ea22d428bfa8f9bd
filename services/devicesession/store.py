"""Plain SQL over asyncpg for devices, sessions, revocations and holder acknowledgements.

Functions take the connection first; the service decides where transactions start. Concurrency
rules live in the SQL: device upsert on its unique key, revocation with one conditional UPDATE
(``revoked_at IS NULL``) so two revokers never both count the same session.

A session is live when it is not revoked (``revoked_at``), not expired, and created after its
account's cutoff, if any (``account_cutoffs``: bulk revocation by account, see migration 0003).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson


@dataclass(frozen=True)
class Device:
    id: int
    uuid: UUID
    account_id: UUID
    client_identifier: str
    kind: str
    product: str
    version: str
    platform: str
    platform_version: str
    device: str
    device_name: str
    model: str
    vendor: str
    provides: str
    public_address: str
    connections: list[dict[str, Any]]
    created_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True)
class DeviceWithToken:
    device: Device
    token_hmac: bytes | None
    active_sessions: int


@dataclass(frozen=True)
class SessionInfo:
    session_id: UUID
    account_id: UUID
    device_id: int
    client_identifier: str
    kind: str
    created_at: datetime
    expires_at: datetime | None


_DEVICE_COLS = (
    "d.id, d.uuid, d.account_id, d.client_identifier, d.kind, d.product, d.version, d.platform, "
    "d.platform_version, d.device, d.device_name, d.model, d.vendor, d.provides, d.public_address, "
    "d.connections, d.created_at, d.last_seen_at"
)

# Not cut off by a bulk revocation of its account (``s`` is the sessions alias).
_NOT_CUT_OFF = ("NOT EXISTS (SELECT 1 FROM account_cutoffs c WHERE c.account_id = s.account_id"
                " AND c.revoked_before >= s.created_at)")


def _device(row: asyncpg.Record) -> Device:
    return Device(**{k: row[k] for k in Device.__dataclass_fields__})


@dataclass(frozen=True)
class MintRow:
    """One session to mint: the device's fields and the new session's id, token HMAC and expiry."""

    account_id: UUID
    fields: dict[str, Any]
    session_id: UUID
    token_hmac: bytes
    expires_at: datetime | None


_MINT_TEXT = ("client_identifier", "kind", "product", "version", "platform", "platform_version", "device",
              "device_name", "model", "vendor", "provides", "public_address")


async def mint_sessions(conn: asyncpg.Connection | asyncpg.Pool, rows: list[MintRow]) -> list[tuple[Device, datetime]]:
    """Create the device of each (account, client identifier) or refresh its descriptive fields, and
    add a session for it: one statement for the whole list (one round trip, atomic without an explicit
    transaction). The rows must name distinct devices: one INSERT ... ON CONFLICT cannot touch a row
    twice. Returns (device, issued at) in the order of ``rows``."""
    if not rows:
        return []
    text_columns = [[r.fields[name] for r in rows] for name in _MINT_TEXT]
    records = await conn.fetch(
        """
        WITH i AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                 $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                                 $13::text[], $14::text[], $15::uuid[], $16::bytea[], $17::timestamptz[])
                AS t(account_id, client_identifier, kind, product, version, platform, platform_version, device,
                     device_name, model, vendor, provides, public_address, connections, session_id, token_hmac,
                     expires_at)
        ), d AS (
            INSERT INTO devices AS d (account_id, client_identifier, kind, product, version, platform,
                platform_version, device, device_name, model, vendor, provides, public_address, connections)
            SELECT account_id, client_identifier, kind, product, version, platform, platform_version, device,
                   device_name, model, vendor, provides, public_address, connections::jsonb FROM i
            ON CONFLICT (account_id, client_identifier) DO UPDATE SET
                kind = EXCLUDED.kind, product = EXCLUDED.product, version = EXCLUDED.version,
                platform = EXCLUDED.platform, platform_version = EXCLUDED.platform_version,
                device = EXCLUDED.device, device_name = EXCLUDED.device_name, model = EXCLUDED.model,
                vendor = EXCLUDED.vendor, provides = EXCLUDED.provides,
                public_address = CASE WHEN EXCLUDED.public_address = '' THEN d.public_address
                                      ELSE EXCLUDED.public_address END,
                connections = CASE WHEN EXCLUDED.connections = '[]'::jsonb THEN d.connections
                                   ELSE EXCLUDED.connections END,
                last_seen_at = now(), removed_at = NULL
            RETURNING """ + _DEVICE_COLS.replace("d.", "") + """
        ), s AS (
            INSERT INTO sessions (id, token_hmac, account_id, device_id, expires_at)
            SELECT i.session_id, i.token_hmac, i.account_id, d.id, i.expires_at
            FROM i JOIN d ON d.account_id = i.account_id AND d.client_identifier = i.client_identifier
            RETURNING id, device_id, created_at AS issued_at
        )
        SELECT d.*, s.id AS session_id, s.issued_at FROM s JOIN d ON d.id = s.device_id
        """,
        [r.account_id for r in rows],
        *text_columns,
        [orjson.dumps(r.fields["connections"]).decode() for r in rows],
        [r.session_id for r in rows],
        [r.token_hmac for r in rows],
        [r.expires_at for r in rows],
    )
    by_session = {rec["session_id"]: rec for rec in records}
    out = []
    for r in rows:
        rec = by_session[r.session_id]
        out.append((_device(rec), rec["issued_at"]))
    return out


async def find_active_session(conn: asyncpg.Connection | asyncpg.Pool, token_hmac: bytes) -> SessionInfo | None:
    """The live (not revoked, not expired) session whose token has this HMAC."""
    row = await conn.fetchrow(
        "SELECT s.id, s.account_id, s.device_id, s.created_at, s.expires_at, d.client_identifier, d.kind"
        " FROM sessions s JOIN devices d ON d.id = s.device_id"
        " WHERE s.token_hmac = $1 AND s.revoked_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > now())"
        " AND " + _NOT_CUT_OFF,
        token_hmac,
    )
    if row is None:
        return None
    return SessionInfo(row["id"], row["account_id"], row["device_id"], row["client_identifier"], row["kind"],
                       row["created_at"], row["expires_at"])


async def revoke_sessions(
    conn: asyncpg.Connection,
    *,
    reason: str,
    account_id: UUID | None = None,
    session_ids: list[UUID] | None = None,
    device_id: int | None = None,
    except_session_id: UUID | None = None,
    issued_before: datetime | None = None,
) -> tuple[list[tuple[UUID, UUID]], datetime]:
    """Revoke matching live sessions in one statement; returns (session id, account id) pairs
    actually revoked now (sessions already revoked are not counted twice) and the cutoff time."""
    conditions = ["revoked_at IS NULL", _NOT_CUT_OFF]
    args: list[Any] = [reason]
    if account_id is not None:
        args.append(account_id)
        conditions.append(f"account_id = ${len(args)}")
    if session_ids is not None:
        args.append(session_ids)
        conditions.append(f"id = ANY(${len(args)}::uuid[])")
    if device_id is not None:
        args.append(device_id)
        conditions.append(f"device_id = ${len(args)}")
    if except_session_id is not None:
        args.append(except_session_id)
        conditions.append(f"id <> ${len(args)}")
    if len(conditions) == 2:
        raise ValueError("refusing to revoke without a selector")
    if issued_before is not None:
        args.append(issued_before)
        conditions.append(f"created_at <= ${len(args)}")
    rows = await conn.fetch(
        f"UPDATE sessions s SET revoked_at = now(), revoked_reason = $1 WHERE {' AND '.join(conditions)}"
        " RETURNING id, account_id, revoked_at",
        *args,
    )
    cutoff: datetime = rows[0]["revoked_at"] if rows else await conn.fetchval("SELECT now()")
    return [(r["id"], r["account_id"]) for r in rows], cutoff


async def cut_off_accounts(conn: asyncpg.Connection, *, reason: str, account_ids: list[UUID]
                           ) -> tuple[list[UUID], int, datetime]:
    """Bulk revocation: every session of these accounts created up to now is dead from now on. Writes
    one cutoff per account (whether or not it has sessions, so a sign-in still committing now is cut
    off too) and counts the sessions that were live. Returns (accounts that had live sessions, number of
    sessions, cutoff). Two concurrent bulk revocations of one account may both count its sessions."""
    rows = await conn.fetch(
        """
        WITH live AS (
            SELECT s.account_id, count(*) AS n FROM sessions s
            WHERE s.account_id = ANY($1::uuid[]) AND s.revoked_at IS NULL AND """ + _NOT_CUT_OFF + """
            GROUP BY s.account_id
        ), cut AS (
            INSERT INTO account_cutoffs AS c (account_id, revoked_before, reason)
            SELECT DISTINCT a, now(), $2 FROM unnest($1::uuid[]) AS a
            ON CONFLICT (account_id) DO UPDATE
                SET revoked_before = GREATEST(c.revoked_before, EXCLUDED.revoked_before), reason = EXCLUDED.reason
        )
        SELECT account_id, n, now() AS cutoff FROM live
        """,
        account_ids, reason,
    )
    cutoff: datetime = rows[0]["cutoff"] if rows else await conn.fetchval("SELECT now()")
    return [r["account_id"] for r in rows], sum(int(r["n"]) for r in rows), cutoff


async def insert_revocation(
    conn: asyncpg.Connection,
    revocation_id: UUID,
    *,
    account_id: UUID | None,
    causing_event_id: UUID | None,
    cause: str,
    revoked: int,
    cutoff: datetime,
    incident_id: str | None = None,
) -> bool:
    """Record a revocation; False when one for the same causing event exists already."""
    done = await conn.fetchval(
        "INSERT INTO revocations (id, account_id, causing_event_id, cause, revoked, cutoff, incident_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (causing_event_id) DO NOTHING RETURNING 1",
        revocation_id,
        account_id,
        causing_event_id,
        cause,
        revoked,
        cutoff,
        incident_id,
    )
    return bool(done)


async def find_revocation_by_cause(conn: asyncpg.Connection | asyncpg.Pool,
                                   causing_event_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, revoked, created_at, cause FROM revocations WHERE causing_event_id = $1", causing_event_id
    )


async def list_devices(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID) -> list[DeviceWithToken]:
    """The account's devices that still have a live session, newest first."""
    rows = await conn.fetch(
        "SELECT " + _DEVICE_COLS + ", s.token_hmac, s.n FROM devices d"
        " JOIN LATERAL (SELECT count(*) AS n, (array_agg(token_hmac ORDER BY created_at DESC))[1] AS token_hmac"
        "   FROM sessions s WHERE s.device_id = d.id AND s.revoked_at IS NULL"
        "   AND (s.expires_at IS NULL OR s.expires_at > now()) AND " + _NOT_CUT_OFF + ") s ON s.n > 0"
        " WHERE d.account_id = $1 AND d.removed_at IS NULL ORDER BY d.last_seen_at DESC, d.id DESC",
        account_id,
    )
    return [DeviceWithToken(_device(r), r["token_hmac"], int(r["n"])) for r in rows]


async def find_device(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID, device_id: int) -> Device | None:
    row = await conn.fetchrow(
        "SELECT " + _DEVICE_COLS + " FROM devices d WHERE d.account_id = $1 AND d.id = $2 AND d.removed_at IS NULL",
        account_id,
        device_id,
    )
    return _device(row) if row else None


async def mark_device_removed(conn: asyncpg.Connection, device_id: int) -> None:
    await conn.execute("UPDATE devices SET removed_at = now() WHERE id = $1", device_id)


async def touch_sessions(conn: asyncpg.Connection | asyncpg.Pool, seen: dict[UUID, tuple[int, datetime]]) -> None:
    """Batch update of last-used (sessions) and last-seen (devices) times."""
    if not seen:
        return
    ids = list(seen)
    device_ids = [seen[s][0] for s in ids]
    times = [seen[s][1] for s in ids]
    await conn.execute(
        "UPDATE sessions s SET last_used_at = GREATEST(s.last_used_at, u.t)"
        " FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, t) WHERE s.id = u.id",
        ids,
        times,
    )
    await conn.execute(
        "UPDATE devices d SET last_seen_at = GREATEST(d.last_seen_at, u.t)"
        " FROM (SELECT id, max(t) AS t FROM unnest($1::bigint[], $2::timestamptz[]) AS x(id, t) GROUP BY id) u"
        " WHERE d.id = u.id",
        device_ids,
        times,
    )


async def record_holder(conn: asyncpg.Connection | asyncpg.Pool, holder_id: str) -> None:
    await conn.execute(
        "INSERT INTO holders (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET last_seen_at = now()"
        " WHERE holders.last_seen_at < now() - interval '10 seconds'", holder_id
    )


async def insert_ack(conn: asyncpg.Connection, revocation_id: UUID, holder_id: str, applied_at: datetime,
                     instance_id: str = "") -> None:
    """The acknowledgement row only: its key is the acknowledgement's own, so the acknowledgement
    batches of two replicas never write the same row (see :func:`record_instance_seen`)."""
    await conn.execute(
        "INSERT INTO revocation_acks (revocation_id, holder_id, instance_id, applied_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        revocation_id,
        holder_id,
        instance_id,
        applied_at,
    )


async def record_instance_seen(pool: asyncpg.Pool, holder_id: str, instance_id: str) -> None:
    """A holder instance was heard of: its holder and the instance are known, and their seen-times
    refreshed (kept to 10 s). Two statements of their own, outside any event's transaction, each
    locking one row for one statement: written inside a batch of acknowledgements, these rows (shared
    by every revocation) were held until the batch committed, and two replicas' batches acknowledging
    the same instances in different orders waited on each other."""
    await record_holder(pool, holder_id)
    await pool.execute(
        "INSERT INTO holder_instances (holder_id, instance_id) VALUES ($1, $2)"
        " ON CONFLICT (holder_id, instance_id) DO UPDATE SET last_seen_at = now()"
        " WHERE holder_instances.last_seen_at < now() - interval '10 seconds'",
        holder_id,
        instance_id,
    )


async def revocation_acks(conn: asyncpg.Connection | asyncpg.Pool, revocation_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT holder_id, instance_id, applied_at, received_at FROM revocation_acks WHERE revocation_id = $1"
        " ORDER BY applied_at",
        revocation_id,
    )
    return rows


async def expected_instances(conn: asyncpg.Connection | asyncpg.Pool, since: datetime) -> dict[str, set[str]]:
    """Per holder, the instances alive across ``since``: first acknowledged before it and last at or
    after it (minus the 10 s granularity of last_seen_at)."""
    rows = await conn.fetch(
        "SELECT holder_id, instance_id FROM holder_instances"
        " WHERE first_seen_at < $1 AND last_seen_at >= $1 - interval '10 seconds'",
        since,
    )
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["holder_id"], set()).add(r["instance_id"])
    return out


async def record_introspection(conn: asyncpg.Connection | asyncpg.Pool, holder_id: str, instance: str) -> None:
    await conn.execute(
        "INSERT INTO holder_instances AS h (holder_id, instance_id, last_introspected_at) VALUES ($1, $2, now())"
        " ON CONFLICT (holder_id, instance_id) DO UPDATE SET last_introspected_at = now(),"
        " last_seen_at = greatest(h.last_seen_at, now())",
        holder_id, instance,
    )


async def caching_instances(conn: asyncpg.Connection | asyncpg.Pool, holders: list[str], window: float
                            ) -> set[tuple[str, str]]:
    """(holder, instance) pairs of these holders that asked about an active token within ``window``
    seconds: the instances whose caches may still hold a token revoked now."""
    rows = await conn.fetch(
        "SELECT holder_id, instance_id FROM holder_instances WHERE holder_id = ANY($1::text[])"
        " AND last_introspected_at >= now() - make_interval(secs => $2)",
        holders, window,
    )
    return {(r["holder_id"], r["instance_id"]) for r in rows}


async def acked_instances(conn: asyncpg.Connection | asyncpg.Pool, revocation_id: UUID) -> set[tuple[str, str]]:
    rows = await conn.fetch("SELECT holder_id, instance_id FROM revocation_acks WHERE revocation_id = $1",
                            revocation_id)
    return {(r["holder_id"], r["instance_id"]) for r in rows}


async def holder_ids(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM holders ORDER BY id")]


async def incident_revocations(conn: asyncpg.Connection | asyncpg.Pool, incident_id: str) -> dict[str, Any]:
    """Revocations of an incident and, per holder and per instance, how many it acknowledged and how fast."""
    totals = await conn.fetchrow(
        "SELECT count(*) AS events, coalesce(sum(revoked), 0) AS revoked, min(created_at) AS first"
        " FROM revocations WHERE incident_id = $1",
        incident_id,
    )
    rows = await conn.fetch(
        "SELECT a.holder_id, a.instance_id, count(*) AS applied,"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM a.applied_at - r.created_at)) AS p99"
        " FROM revocation_acks a JOIN revocations r ON r.id = a.revocation_id WHERE r.incident_id = $1"
        " GROUP BY a.holder_id, a.instance_id ORDER BY a.holder_id, a.instance_id",
        incident_id,
    )
    holders: dict[str, dict[str, Any]] = {}
    instances: dict[str, dict[str, dict[str, Any]]] = {}
    for h in rows:
        agg = holders.setdefault(h["holder_id"], {"applied": 0, "p99_seconds": 0.0})
        # A holder has applied a revocation when every instance has: report its slowest instance.
        done = int(h["applied"])
        agg["applied"] = done if h["holder_id"] not in instances else min(agg["applied"], done)
        agg["p99_seconds"] = max(agg["p99_seconds"], float(h["p99"] or 0))
        instances.setdefault(h["holder_id"], {})[h["instance_id"]] = {"applied": done,
                                                                       "p99_seconds": float(h["p99"] or 0)}
    if totals["first"] is not None:
        for holder, alive in (await expected_instances(conn, totals["first"])).items():
            for inst in alive:
                if inst not in instances.setdefault(holder, {}):
                    instances[holder][inst] = {"applied": 0, "p99_seconds": 0.0}
                    holders.setdefault(holder, {"applied": 0, "p99_seconds": 0.0})["applied"] = 0
    return {
        "events": int(totals["events"]),
        "revoked": int(totals["revoked"]),
        "holders": holders,
        "instances": instances,
        "known_holders": await holder_ids(conn),
    }


async def set_connections(conn: asyncpg.Connection | asyncpg.Pool, device_id: int,
                          connections: list[dict[str, Any]]) -> None:
    """Replace the connections a device published (PUT /devices/{clientIdentifier})."""
    await conn.execute("UPDATE devices SET connections = $2::jsonb, last_seen_at = now() WHERE id = $1",
                       device_id, connections)  # the pool's jsonb codec encodes it
