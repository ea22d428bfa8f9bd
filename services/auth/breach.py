"""Breach response: flag accounts as requiring a reset, sign everything out, email everyone.

One incident is processed in set-based batches over ``accounts`` in id order. Each batch is ONE
transaction that:

1. selects the next ``batch_size`` matching accounts after the incident's cursor;
2. inserts them into ``incident_accounts`` (``ON CONFLICT DO NOTHING``): only accounts not yet
   handled for this incident go on, so a rerun flags, revokes and emails nobody twice;
3. flags those accounts (one UPDATE), creates their reset tokens (one INSERT from arrays, HMACs
   only) when notifying;
4. writes two events through the outbox: ``accounts.reset_required`` (the batch, with each reset
   token sealed for notification) and, with sign-out, ``passwords.changed`` (the batch form of
   ``password.changed``, cause ``forced``), which devicesession turns into one set-based revocation
   and one ``sessions.revoked`` that every holder applies;
5. moves the cursor.

A crash or Ctrl-C loses at most the batch in flight, which rolls back; running the command again
continues from the cursor. Memory is one batch, whatever the number of accounts.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from shared import outbox, tokens
from shared.crypto import Sealer
from shared.events import AccountsResetRequired, PasswordsChanged, envelope, iso, utcnow

PRODUCER = "auth-admin"
NOTICE_CHUNK = 1000  # accounts per accounts.reset_required event (~230 KB with sealed tokens)


class IncidentMismatch(Exception):
    """The incident exists with another selection or other options."""


@dataclass(frozen=True)
class Selection:
    all: bool = False
    created_before: datetime | None = None
    accounts_file: Path | None = None

    def describe(self) -> dict[str, Any]:
        if self.all:
            return {"all": True}
        if self.created_before is not None:
            return {"created_before": self.created_before.isoformat()}
        assert self.accounts_file is not None
        digest = hashlib.sha256(self.accounts_file.read_bytes()).hexdigest()
        return {"accounts_file_sha256": digest}


@dataclass
class Outcome:
    selected: int = 0
    already: int = 0
    flagged: int = 0
    emails: int = 0
    revocation_batches: int = 0
    batches: int = 0


async def load_accounts_file(conn: asyncpg.Connection, path: Path) -> int:
    """Load logins (emails, usernames or account ids, one per line) into a temporary table of ids."""
    await conn.execute("CREATE TEMP TABLE IF NOT EXISTS selection_logins (login text) ON COMMIT PRESERVE ROWS")
    await conn.execute("CREATE TEMP TABLE IF NOT EXISTS selection_ids (id uuid PRIMARY KEY) ON COMMIT PRESERVE ROWS")
    await conn.execute("TRUNCATE selection_logins, selection_ids")
    with path.open("rb") as fh:
        await conn.copy_to_table("selection_logins", source=fh, columns=["login"], format="text")
    await conn.execute(
        "INSERT INTO selection_ids SELECT a.id FROM selection_logins s JOIN accounts a"
        " ON a.email_norm = lower(trim(s.login)) OR a.username_norm = lower(trim(s.login))"
        "   OR a.id::text = lower(trim(s.login)) ON CONFLICT DO NOTHING"
    )
    count: int = await conn.fetchval("SELECT count(*) FROM selection_ids")
    return count


def _where(sel: Selection) -> tuple[str, list[Any]]:
    if sel.all:
        return "TRUE", []
    if sel.created_before is not None:
        return "a.created_at < $X", [sel.created_before]
    return "a.id IN (SELECT id FROM selection_ids)", []


async def count_selected(conn: asyncpg.Connection, sel: Selection) -> int:
    where, args = _where(sel)
    value: int = await conn.fetchval(f"SELECT count(*) FROM accounts a WHERE {where.replace('$X', '$1')}", *args)
    return value


async def start_incident(conn: asyncpg.Connection, incident_id: str, sel: Selection, *, sign_out: bool,
                         notify: bool, reason: str) -> asyncpg.Record:
    """Create the incident, or find it again (resume) if it has the same selection and options."""
    selector = sel.describe()
    await conn.execute(
        "INSERT INTO incidents (id, selector, sign_out, notify, reason) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (id) DO NOTHING",
        incident_id, selector, sign_out, notify, reason,
    )
    row = await conn.fetchrow("SELECT * FROM incidents WHERE id = $1", incident_id)
    assert row is not None
    if json.dumps(row["selector"], sort_keys=True) != json.dumps(selector, sort_keys=True) \
            or row["sign_out"] != sign_out or row["notify"] != notify:
        raise IncidentMismatch(
            f"incident {incident_id} was started with {row['selector']}, sign_out={row['sign_out']}, "
            f"notify={row['notify']}; use a new incident id for a different selection")
    return row


async def run_batch(conn: asyncpg.Connection, incident: asyncpg.Record, sel: Selection, *, batch_size: int,
                    key: bytes, sealer: Sealer, reset_url: str, ttl: int, auth_topic: str
                    ) -> tuple[int, int, bool]:
    """Process the next batch in one transaction. Returns (accounts scanned, newly flagged, done)."""
    incident_id = incident["id"]
    where, args = _where(sel)
    async with conn.transaction():
        cursor = await conn.fetchval("SELECT cursor_id FROM incidents WHERE id = $1 FOR UPDATE", incident_id)
        params: list[Any] = [cursor or uuid.UUID(int=0), batch_size, incident_id, *args]
        rows = await conn.fetch(
            f"""
            WITH batch AS (
                SELECT a.id, a.email, a.username FROM accounts a
                WHERE a.id > $1 AND {where.replace('$X', '$4')} ORDER BY a.id LIMIT $2
            ), fresh AS (
                INSERT INTO incident_accounts (incident_id, account_id) SELECT $3, id FROM batch
                ON CONFLICT DO NOTHING RETURNING account_id
            )
            SELECT b.id, b.email, b.username, f.account_id IS NOT NULL AS fresh
            FROM batch b LEFT JOIN fresh f ON f.account_id = b.id ORDER BY b.id
            """,
            *params,
        )
        if not rows:
            await conn.execute("UPDATE incidents SET finished_at = coalesce(finished_at, now()) WHERE id = $1",
                               incident_id)
            return 0, 0, True
        fresh = [r for r in rows if r["fresh"]]
        ids = [r["id"] for r in fresh]
        batch_no = incident["batches"] + 1
        if ids:
            await conn.execute(
                "UPDATE accounts SET reset_required_at = now(), reset_required_reason = $2,"
                " reset_required_incident = $3 WHERE id = ANY($1::uuid[])",
                ids, incident["reason"], incident_id)
            accounts: list[dict[str, Any]] = []
            expires = utcnow() + timedelta(seconds=ttl)
            if incident["notify"]:
                plain = [tokens.new_token(tokens.RESET_TOKEN_BYTES) for _ in ids]
                await conn.execute(
                    "INSERT INTO reset_tokens (token_hmac, account_id, expires_at, incident_id)"
                    " SELECT h, a, $3, $4 FROM unnest($1::bytea[], $2::uuid[]) AS x(h, a)",
                    [tokens.digest(key, t, purpose="reset") for t in plain], ids, expires, incident_id)
                for r, t in zip(fresh, plain, strict=True):
                    accounts.append({"account_id": str(r["id"]), "email": r["email"], "username": r["username"],
                                     "sealed_token": sealer.seal(t, context=str(r["id"]))})
            else:
                accounts = [{"account_id": str(r["id"]), "email": r["email"], "username": r["username"]}
                            for r in fresh]
            # Notification's part travels in chunks (each account carries its sealed token), so an
            # event stays far below the broker's 1 MB record limit whatever the batch size.
            events = [envelope(AccountsResetRequired(
                incident_id=incident_id, batch=batch_no, reason=incident["reason"], notify=incident["notify"],
                accounts=accounts[i:i + NOTICE_CHUNK], reset_url=reset_url if incident["notify"] else None,
                expires_at=iso(expires) if incident["notify"] else None), producer=PRODUCER, key=incident_id)
                for i in range(0, len(accounts), NOTICE_CHUNK)]
            if incident["sign_out"]:
                events.append(envelope(PasswordsChanged(
                    incident_id=incident_id, batch=batch_no, account_ids=[str(i) for i in ids], cause="forced",
                    revoke_sessions=True, reason=incident["reason"], changed_at=iso(utcnow())),
                    producer=PRODUCER, key=incident_id))
            await outbox.add_many(conn, auth_topic, events)
        await conn.execute(
            "UPDATE incidents SET cursor_id = $2, batches = batches + 1, flagged = flagged + $3,"
            " revocation_events = revocation_events + $4 WHERE id = $1",
            incident_id, rows[-1]["id"], len(ids), 1 if ids and incident["sign_out"] else 0)
        return len(rows), len(ids), False


async def run_incident(conn: asyncpg.Connection, incident_id: str, sel: Selection, *, batch_size: int, key: bytes,
                       sealer: Sealer, reset_url: str, ttl: int, auth_topic: str,
                       progress: Callable[[int, int], None] | None = None) -> Outcome:
    outcome = Outcome()
    while True:
        incident = await conn.fetchrow("SELECT * FROM incidents WHERE id = $1", incident_id)
        scanned, flagged, done = await run_batch(conn, incident, sel, batch_size=batch_size, key=key, sealer=sealer,
                                                 reset_url=reset_url, ttl=ttl, auth_topic=auth_topic)
        if done:
            return outcome
        outcome.batches += 1
        outcome.flagged += flagged
        outcome.already += scanned - flagged
        if flagged:
            outcome.emails += flagged if incident["notify"] else 0
            outcome.revocation_batches += 1 if incident["sign_out"] else 0
        if progress:
            progress(scanned, flagged)


async def incident_summary(conn: asyncpg.Connection, incident_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM incidents WHERE id = $1", incident_id)
    if row is None:
        return None
    reset_since = await conn.fetchval(
        "SELECT count(*) FROM incident_accounts i JOIN accounts a ON a.id = i.account_id"
        " WHERE i.incident_id = $1 AND a.password_changed_at > i.flagged_at",
        incident_id)
    return {"incident": incident_id, "selector": row["selector"], "sign_out": row["sign_out"],
            "notify": row["notify"], "reason": row["reason"], "started_at": row["started_at"].isoformat(),
            "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
            "flagged": int(row["flagged"]), "batches": row["batches"], "revocation_events": row["revocation_events"],
            "reset_since": int(reset_since)}


async def audit_start(conn: asyncpg.Connection, actor: str, action: str, args: dict[str, Any]) -> int:
    value: int = await conn.fetchval("INSERT INTO admin_audit (actor, action, args) VALUES ($1, $2, $3) RETURNING id",
                                     actor, action, args)
    return value


async def audit_finish(conn: asyncpg.Connection, audit_id: int, outcome: str, affected: int | None) -> None:
    await conn.execute("UPDATE admin_audit SET outcome = $2, affected = $3, finished_at = now() WHERE id = $1",
                       audit_id, outcome, affected)
