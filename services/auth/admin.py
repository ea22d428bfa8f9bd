"""``hearth admin``: operator commands (breach response, session revocation, holder credentials).

Settings come from the environment like a service's (auth's), with ``--env-file`` (default
``.run/hearth.env``, written by the local launcher) supplying what the environment lacks. Every
command is recorded in ``admin_audit`` (who, when, what, how many, outcome).
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import click
from tqdm import tqdm

from services.auth import breach, store
from services.auth.service import normalise_login
from services.auth.settings import Settings
from shared import db, stackenv
from shared.crypto import Sealer
from shared.events import AUTH_EVENTS
from shared.holder import holder_secret
from shared.internal import InternalClient
from shared.settings import load

MIGRATIONS = Path(__file__).parent / "migrations"


def _load_env(path: str | None) -> None:
    try:
        stackenv.load(path)
    except stackenv.EnvFileError as exc:
        raise click.ClickException(str(exc)) from exc


def _settings(env_file: str | None) -> Settings:
    _load_env(env_file)
    os.environ.setdefault("SERVICE_NAME", "auth")
    return load(Settings, service_name="auth")


def _actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


async def _connect(s: Settings) -> asyncpg.Connection:
    pool = await db.create_pool(s.db_url(), min_size=1, max_size=1)
    await db.migrate(pool, [("auth", MIGRATIONS)])
    await pool.close()
    conn: asyncpg.Connection = await asyncpg.connect(s.db_url())
    await db.init_connection(conn)
    return conn


@click.group("admin")
@click.option("--env-file", default=None, help="KEY=VALUE file for settings missing from the environment "
              "(default: .run/hearth.env when present)")
@click.pass_context
def command(ctx: click.Context, env_file: str | None) -> None:
    """Operator commands: breach response, session revocation, holder credentials."""
    ctx.obj = {"env_file": env_file}


# --------------------------------------------------------------------------------- force-reset


@command.command("force-reset")
@click.option("--incident", "incident_id", required=True, help="incident id: reruns with it resume")
@click.option("--all", "select_all", is_flag=True, help="every account")
@click.option("--accounts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="one email, username or account id per line")
@click.option("--created-before", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              help="accounts created before this date (UTC)")
@click.option("--sign-out-devices", is_flag=True, help="revoke every session of the selected accounts")
@click.option("--notify", is_flag=True, help="email each person the breach notice with a reset link")
@click.option("--reason", default="As a precaution after a security incident, we are requiring a password reset.",
              show_default=False, help="shown to people in the email")
@click.option("--dry-run", is_flag=True, help="report what would happen, change nothing")
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1, 10000),
              help="accounts per transaction (and per revocation event)")
@click.option("--wait", default=60.0, show_default=True, help="seconds to wait for revocations and emails to be "
              "confirmed before the summary")
@click.pass_context
def force_reset(ctx: click.Context, incident_id: str, select_all: bool, accounts_file: Path | None,
                created_before: datetime | None, sign_out_devices: bool, notify: bool, reason: str, dry_run: bool,
                batch_size: int, wait: float) -> None:
    """Require the selected accounts to reset their passwords (resumable, idempotent per incident)."""
    chosen = [x for x in (select_all, accounts_file, created_before) if x]
    if len(chosen) != 1:
        raise click.UsageError("choose exactly one of --all, --accounts-file, --created-before")
    if not 1 <= len(incident_id) <= 100:
        raise click.UsageError("--incident must be 1-100 characters")
    if created_before is not None and created_before.tzinfo is None:
        from datetime import UTC

        created_before = created_before.replace(tzinfo=UTC)
    sel = breach.Selection(all=select_all, created_before=created_before, accounts_file=accounts_file)
    s = _settings(ctx.obj["env_file"])
    args = {"incident": incident_id, "selector": sel.describe(), "sign_out_devices": sign_out_devices,
            "notify": notify, "reason": reason, "dry_run": dry_run, "batch_size": batch_size}
    raise SystemExit(asyncio.run(_force_reset(s, incident_id, sel, sign_out_devices, notify, reason, dry_run,
                                              batch_size, wait, args)))


async def _force_reset(s: Settings, incident_id: str, sel: breach.Selection, sign_out: bool, notify: bool,
                       reason: str, dry_run: bool, batch_size: int, wait: float, args: dict[str, Any]) -> int:
    conn = await _connect(s)
    audit_id = await breach.audit_start(conn, _actor(), "force-reset" + (" (dry run)" if dry_run else ""), args)
    started = time.monotonic()
    try:
        if sel.accounts_file is not None:
            found = await breach.load_accounts_file(conn, sel.accounts_file)
            click.echo(f"accounts file: {found:,} accounts matched")
        selected = await breach.count_selected(conn, sel)
        already = await conn.fetchval("SELECT count(*) FROM incident_accounts WHERE incident_id = $1", incident_id)
        if dry_run:
            click.echo(f"dry run for incident {incident_id}: {selected:,} accounts selected, {already:,} already "
                       f"handled by this incident, {max(0, selected - already):,} would be flagged"
                       + (", their sessions revoked" if sign_out else "")
                       + (", and emailed the breach notice" if notify else "") + ". Nothing was changed.")
            await breach.audit_finish(conn, audit_id, "dry-run", selected)
            return 0
        try:
            incident = await breach.start_incident(conn, incident_id, sel, sign_out=sign_out, notify=notify,
                                                   reason=reason)
        except breach.IncidentMismatch as exc:
            click.echo(f"error: {exc}", err=True)
            await breach.audit_finish(conn, audit_id, "refused", 0)
            return 2
        if incident["cursor_id"] is not None:
            click.echo(f"resuming incident {incident_id} ({incident['flagged']:,} accounts flagged so far)")
        bar = tqdm(total=selected, unit="acct", unit_scale=True, desc=f"incident {incident_id}", file=sys.stderr,
                   dynamic_ncols=True)
        bar.update(int(already))

        def progress(scanned: int, flagged: int) -> None:
            bar.update(scanned)

        outcome = await breach.run_incident(
            conn, incident_id, sel, batch_size=batch_size, key=s.hmac_key(),
            sealer=Sealer(s.seal_keys.get_secret_value()), reset_url=s.public_base_url.rstrip("/") + "/reset",
            ttl=max(s.reset_token_ttl, 7 * 24 * 3600) if notify else s.reset_token_ttl,
            auth_topic=s.topic(AUTH_EVENTS), progress=progress)
        bar.close()
        summary = await breach.incident_summary(conn, incident_id)
        assert summary is not None
        await breach.audit_finish(conn, audit_id, "completed", outcome.flagged)
    except (KeyboardInterrupt, asyncio.CancelledError):
        await breach.audit_finish(conn, audit_id, "interrupted", None)
        click.echo("\ninterrupted: run the same command again to continue where it stopped", err=True)
        return 130
    finally:
        await conn.close()
    revoked, emails = await _confirmations(s, incident_id, summary, wait)
    elapsed = time.monotonic() - started
    click.echo(
        f"incident {incident_id}: {outcome.flagged:,} accounts flagged now ({summary['flagged']:,} in total), "
        f"{outcome.already:,} already handled; sessions revoked: {revoked}; emails queued: {emails}; "
        f"elapsed {elapsed:.1f}s")
    return 0


async def _confirmations(s: Settings, incident_id: str, summary: dict[str, Any], wait: float) -> tuple[str, str]:
    """Wait (bounded) for devicesession and notification to confirm the incident's effects."""
    secret = s.internal_api_secret.get_secret_value()
    devicesession = InternalClient(s.devicesession_url, secret)
    notification = InternalClient(os.environ.get("NOTIFICATION_URL", "http://127.0.0.1:8104"), secret)
    revoked, emails = "not requested", "not requested"
    deadline = time.monotonic() + wait
    try:
        while True:
            done = True
            if summary["sign_out"]:
                try:
                    r = await devicesession.call("GET", f"/internal/incidents/{incident_id}/revocations")
                    revoked = f"{r['revoked']:,} ({r['events']}/{summary['revocation_events']} revocation events " \
                              "applied by devicesession)"
                    done = done and r["events"] >= summary["revocation_events"]
                except Exception as exc:  # noqa: BLE001 - the summary says what it could not confirm
                    revoked, done = f"unconfirmed ({type(exc).__name__})", False
            if summary["notify"]:
                try:
                    n = await notification.call("GET", f"/internal/incidents/{incident_id}/deliveries")
                    total = sum(n["deliveries"].values())
                    emails = f"{total:,} ({n['deliveries'].get('sent', 0):,} sent so far)"
                    done = done and total >= summary["flagged"]
                except Exception as exc:  # noqa: BLE001
                    emails, done = f"unconfirmed ({type(exc).__name__})", False
            if done or time.monotonic() > deadline:
                return revoked, emails
            await asyncio.sleep(0.5)
    finally:
        await devicesession.close()
        await notification.close()


# --------------------------------------------------------------------------------- incident status


@command.group("incident")
def incident() -> None:
    """Incidents of the breach command."""


@incident.command("status")
@click.argument("incident_id")
@click.pass_context
def incident_status(ctx: click.Context, incident_id: str) -> None:
    """Progress and outcome of an incident: flagged, reset since, emails, holders that applied it."""
    s = _settings(ctx.obj["env_file"])
    raise SystemExit(asyncio.run(_incident_status(s, incident_id)))


async def _incident_status(s: Settings, incident_id: str) -> int:
    conn = await _connect(s)
    try:
        summary = await breach.incident_summary(conn, incident_id)
    finally:
        await conn.close()
    if summary is None:
        click.echo(f"no incident {incident_id}", err=True)
        return 1
    state = "finished " + summary["finished_at"] if summary["finished_at"] else "in progress (or interrupted)"
    click.echo(f"incident {incident_id}: {state}; started {summary['started_at']}")
    click.echo(f"  selection: {summary['selector']}; sign out: {summary['sign_out']}; notify: {summary['notify']}")
    click.echo(f"  accounts flagged: {summary['flagged']:,}; reset their password since: {summary['reset_since']:,}")
    secret = s.internal_api_secret.get_secret_value()
    devicesession = InternalClient(s.devicesession_url, secret)
    notification = InternalClient(os.environ.get("NOTIFICATION_URL", "http://127.0.0.1:8104"), secret)
    try:
        if summary["notify"]:
            n = await notification.call("GET", f"/internal/incidents/{incident_id}/deliveries")
            parts = ", ".join(f"{k} {v:,}" for k, v in sorted(n["deliveries"].items())) or "none yet"
            click.echo(f"  emails: {parts}")
        if summary["sign_out"]:
            r = await devicesession.call("GET", f"/internal/incidents/{incident_id}/revocations")
            click.echo(f"  sessions revoked: {r['revoked']:,} in {r['events']:,} revocation events")
            per_instance = r.get("instances", {})
            for holder in sorted(set(r["known_holders"]) | set(r["holders"])):
                h = r["holders"].get(holder)
                insts = per_instance.get(holder, {})
                complete = sorted(i for i, v in insts.items() if v["applied"] >= r["events"])
                if h and insts:
                    click.echo(f"    holder {holder}: applied all on {len(complete)} of {len(insts)} instances"
                               f" (p99 {h['p99_seconds'] * 1000:.0f} ms)")
                    for inst, v in sorted(insts.items()):
                        if v["applied"] < r["events"]:
                            click.echo(f"      instance {inst or '-'}: applied {v['applied']:,}/{r['events']:,}")
                elif h:
                    done = "all" if h["applied"] >= r["events"] else f"{h['applied']:,}/{r['events']:,}"
                    click.echo(f"    holder {holder}: applied {done} (p99 {h['p99_seconds'] * 1000:.0f} ms)")
                else:
                    click.echo(f"    holder {holder}: applied none")
    finally:
        await devicesession.close()
        await notification.close()
    return 0


# --------------------------------------------------------------------------------- other commands


@command.command("revoke-sessions")
@click.option("--account", "login", help="email, username or account id")
@click.option("--all", "everyone", is_flag=True, help="every account")
@click.option("--reason", default="admin", show_default=True)
@click.pass_context
def revoke_sessions(ctx: click.Context, login: str | None, everyone: bool, reason: str) -> None:
    """Sign out every session of one account, or of every account."""
    if bool(login) == everyone:
        raise click.UsageError("choose exactly one of --account and --all")
    s = _settings(ctx.obj["env_file"])
    raise SystemExit(asyncio.run(_revoke(s, login, reason)))


async def _revoke(s: Settings, login: str | None, reason: str) -> int:
    conn = await _connect(s)
    client = InternalClient(s.devicesession_url, s.internal_api_secret.get_secret_value())
    audit_id = await breach.audit_start(conn, _actor(), "revoke-sessions", {"account": login, "reason": reason})
    total = 0
    try:
        if login:
            account_id = await _resolve(conn, login)
            if account_id is None:
                click.echo(f"no account {login}", err=True)
                await breach.audit_finish(conn, audit_id, "not found", 0)
                return 1
            result = await client.call("POST", "/internal/sessions/revoke",
                                       {"account_id": str(account_id), "cause": reason[:40]})
            total = result["revoked"]
        else:
            count = await conn.fetchval("SELECT count(*) FROM accounts")
            bar = tqdm(total=count, unit="acct", unit_scale=True, desc="revoking", file=sys.stderr)
            last = uuid.UUID(int=0)
            while True:
                ids = [r["id"] for r in await conn.fetch(
                    "SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT 1000", last)]
                if not ids:
                    break
                result = await client.call("POST", "/internal/sessions/revoke", {
                    "account_ids": [str(i) for i in ids], "cause": reason[:40], "key": f"admin:{uuid.uuid4()}"})
                total += result["revoked"]
                last = ids[-1]
                bar.update(len(ids))
            bar.close()
        await breach.audit_finish(conn, audit_id, "completed", total)
    finally:
        await client.close()
        await conn.close()
    click.echo(f"{total:,} sessions revoked")
    return 0


async def _resolve(conn: asyncpg.Connection, login: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(login)
    except ValueError:
        pass
    account = await store.find_by_login(conn, normalise_login(login))
    return account.id if account is not None else None


@command.group("two-factor")
def two_factor_group() -> None:
    """Two-step verification of one account (for a person who lost their device)."""


@two_factor_group.command("disable")
@click.option("--account", "login", required=True, help="email, username or account id")
@click.option("--reason", required=True, help="why (recorded in the audit trail and emailed to the person)")
@click.pass_context
def two_factor_disable(ctx: click.Context, login: str, reason: str) -> None:
    """Turn two-step verification off for one account: audited, and the person is emailed."""
    reason = reason.strip()
    if not 1 <= len(reason) <= 500:
        raise click.UsageError("--reason must be 1-500 characters")
    s = _settings(ctx.obj["env_file"])
    raise SystemExit(asyncio.run(_two_factor_disable(s, login, reason)))


async def _two_factor_disable(s: Settings, login: str, reason: str) -> int:
    from services.auth import store, two_factor
    from shared import outbox

    conn = await _connect(s)
    audit_id = await breach.audit_start(conn, _actor(), "two-factor-disable", {"account": login, "reason": reason})
    try:
        account_id = await _resolve(conn, login)
        account = await store.find_by_id(conn, account_id) if account_id else None
        if account is None:
            click.echo(f"no account {login}", err=True)
            await breach.audit_finish(conn, audit_id, "not found", 0)
            return 1
        async with conn.transaction():
            done = await two_factor.disable_rows(conn, account.id)
            if done:
                await outbox.add(conn, s.topic(AUTH_EVENTS), two_factor.disabled_event(account, by="admin",
                                                                                      reason=reason))
        if not done:
            click.echo(f"two-step verification is not on for {account.username}", err=True)
            await breach.audit_finish(conn, audit_id, "not enabled", 0)
            return 1
        await breach.audit_finish(conn, audit_id, "completed", 1)
    finally:
        await conn.close()
    click.echo(f"two-step verification turned off for {account.username}; they will be emailed")
    return 0


@command.command("holder-credentials")
@click.argument("name")
@click.pass_context
def holder_credentials(ctx: click.Context, name: str) -> None:
    """Print the introspection credential of holder NAME (HTTP Basic NAME:credential)."""
    _load_env(ctx.obj["env_file"])
    master = os.environ.get("HOLDER_SECRET")
    if not master:
        raise click.ClickException("HOLDER_SECRET is not set")
    click.echo(holder_secret(master, name))


@command.command("audit")
@click.option("--limit", default=20, show_default=True)
@click.pass_context
def audit(ctx: click.Context, limit: int) -> None:
    """The most recent admin actions."""
    s = _settings(ctx.obj["env_file"])

    async def show() -> None:
        conn = await _connect(s)
        try:
            for r in await conn.fetch("SELECT * FROM admin_audit ORDER BY id DESC LIMIT $1", limit):
                click.echo(f"{r['started_at']:%Y-%m-%d %H:%M:%S} {r['actor']} {r['action']} {r['outcome']} "
                           f"affected={r['affected']} {r['args']}")
        finally:
            await conn.close()

    asyncio.run(show())
