"""The breach command on the real stack: hearth admin force-reset / incident status / revoke-sessions."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from deploy.launcher import Stack
from shared.passwords import Passwords
from shared.settings import with_database
from tests.auth.test_auth import PASSWORD, sign_in, sign_up, user_status
from tests.conftest import ROOT, TEST_HOLDERS, EventTap, edge_json, eventually
from tests.notification.test_notification import body_text, mails

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]
BREACH_SUBJECT = "Action required: reset your Hearth password"


def admin(stack: Stack, *args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "admin", *args]


def admin_env(stack: Stack) -> dict[str, str]:
    return {**stack.env, "SERVICE_NAME": "auth"}


async def run_admin(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, admin(stack, *args), cwd=ROOT, env=admin_env(stack),
                                   capture_output=True, text=True, timeout=240)


async def library(stack: Stack, holder: str, token: str) -> int:
    """The status every instance of ``holder`` answers (200 or 401; anything mixed fails)."""
    statuses = set()
    async with aiohttp.ClientSession() as http:
        for port in stack.holder_ports(holder):
            async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": token}) as r:
                statuses.add(r.status)
    return statuses.pop() if len(statuses) == 1 else -1


async def refused_everywhere(stack: Stack, tokens: list[str]) -> bool:
    for holder in TEST_HOLDERS:
        for t in tokens:
            if await library(stack, holder, t) != 401:
                return False
    return True


async def auth_db(stack: Stack) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(stack.database_url, f"{stack.extra_env['DB_NAME_PREFIX']}hearth_auth"))


async def test_forced_reset_flags_signs_out_and_emails_exactly_once(stack: Stack, tmp_path: Path) -> None:
    people = [await sign_up(stack) for _ in range(6)]
    tokens: dict[str, list[str]] = {}
    for p in people:
        tokens[p["username"]] = []
        for client in ("tv", "phone"):
            _, body, _ = await sign_in(stack, p["username"], client=client)
            tokens[p["username"]].append(body["authToken"])
    for p in people:  # every holder holds every session
        for t in tokens[p["username"]]:
            for holder in TEST_HOLDERS:
                assert await library(stack, holder, t) == 200
    chosen, spared = people[:4], people[4:]
    accounts_file = tmp_path / "affected.txt"
    accounts_file.write_text("\n".join(p["email"].upper() if i % 2 else p["username"] for i, p in enumerate(chosen))
                             + "\nnobody-here@example.org\n")
    incident = f"inc-{uuid.uuid4().hex[:6]}"
    reason = "A third party read a copy of our account database."
    dry = await run_admin(stack, "force-reset", "--incident", incident, "--accounts-file", str(accounts_file),
                          "--sign-out-devices", "--notify", "--dry-run")
    assert dry.returncode == 0 and "4 would be flagged" in dry.stdout, dry.stdout + dry.stderr
    result = await run_admin(stack, "force-reset", "--incident", incident, "--accounts-file", str(accounts_file),
                             "--sign-out-devices", "--notify", "--reason", reason, "--batch-size", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    # three sessions each: sign-up (the "tests" client) and two sign-ins
    assert "4 accounts flagged now" in result.stdout and "sessions revoked: 12 (" in result.stdout, result.stdout
    # flagged accounts are refused at sign-in, and their tokens everywhere
    for p in chosen:
        status, body, _ = await sign_in(stack, p["username"])
        assert status == 403 and body["errors"][0]["code"] == 1110
    await eventually(lambda: refused_everywhere(stack, [t for p in chosen for t in tokens[p["username"]]]), timeout=5)
    # the spared are untouched
    for p in spared:
        assert (await sign_in(stack, p["username"]))[0] == 201
        for t in tokens[p["username"]]:
            assert await user_status(stack, t) == 200
            assert await library(stack, TEST_HOLDERS[0], t) == 200
    # exactly one breach email each
    for p in chosen:
        got = await eventually(lambda p=p: [m for m in mails(stack.mail_dir, p["email"]) if m["Subject"] == BREACH_SUBJECT],
                               timeout=15)
        assert len(got) == 1 and reason in body_text(got[0])
    # running it again does nothing twice
    again = await run_admin(stack, "force-reset", "--incident", incident, "--accounts-file", str(accounts_file),
                            "--sign-out-devices", "--notify", "--reason", reason, "--wait", "2")
    assert again.returncode == 0 and "0 accounts flagged now" in again.stdout, again.stdout
    await asyncio.sleep(2)
    for p in chosen:
        assert len([m for m in mails(stack.mail_dir, p["email"]) if m["Subject"] == BREACH_SUBJECT]) == 1
    for p in spared:
        assert not [m for m in mails(stack.mail_dir, p["email"]) if m["Subject"] == BREACH_SUBJECT]
    # a reset through the emailed link signs the person in again
    first = chosen[0]
    msg = [m for m in mails(stack.mail_dir, first["email"]) if m["Subject"] == BREACH_SUBJECT][0]
    link = re.search(r"/reset\?token=(\S+)", body_text(msg))
    assert link
    status, _, _ = await edge_json(stack, "PUT", "/api/v2/users/password",
                                   data={"resetToken": link.group(1), "password": "after the breach 2026"})
    assert status == 204
    assert (await sign_in(stack, first["username"], "after the breach 2026"))[0] == 201
    status_out = await run_admin(stack, "incident", "status", incident)
    assert status_out.returncode == 0
    text = status_out.stdout
    assert "accounts flagged: 4" in text and "reset their password since: 1" in text, text
    assert "sessions revoked: 12" in text
    for holder in TEST_HOLDERS:
        n = stack.holder_instances
        assert f"holder {holder}: applied all on {n} of {n} instances" in text, text
    conn = await auth_db(stack)
    try:
        actions = [r["action"] for r in await conn.fetch("SELECT action FROM admin_audit ORDER BY id")]
    finally:
        await conn.close()
    assert "force-reset (dry run)" in actions and actions.count("force-reset") >= 2


async def seed_accounts(stack: Stack, n: int, tag: str) -> list[str]:
    pw = Passwords()
    record = await pw.hash("seeded password 123")
    pw.close()
    conn = await auth_db(stack)
    try:
        rows = await conn.fetch(
            "INSERT INTO accounts (id, email, email_norm, username, username_norm, password_hash)"
            " SELECT gen_random_uuid(), 'seed' || g || $1 || '@example.org', 'seed' || g || $1 || '@example.org',"
            " 's' || g || $1, 's' || g || $1, $2 FROM generate_series(1, $3) g RETURNING username",
            tag, record, n)
    finally:
        await conn.close()
    return [r["username"] for r in rows]


async def test_killed_halfway_and_rerun_finishes_with_no_duplicates(stack: Stack, tmp_path: Path,
                                                                    tap: EventTap) -> None:
    names = await seed_accounts(stack, 1000, uuid.uuid4().hex[:6])
    accounts_file = tmp_path / "many.txt"
    accounts_file.write_text("\n".join(names) + "\n")
    incident = f"kill-{uuid.uuid4().hex[:6]}"
    argv = admin(stack, "force-reset", "--incident", incident, "--accounts-file", str(accounts_file),
                 "--sign-out-devices", "--batch-size", "5")
    proc = subprocess.Popen(argv, cwd=ROOT, env=admin_env(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    conn = await auth_db(stack)
    try:
        async def progressed() -> bool:
            value = await conn.fetchval("SELECT flagged FROM incidents WHERE id = $1", incident)
            return bool(value and value >= 150)

        await eventually(progressed, timeout=60, interval=0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = await conn.fetchval("SELECT flagged FROM incidents WHERE id = $1", incident)
        assert 150 <= before < 1000, before
        result = await asyncio.to_thread(subprocess.run, argv, cwd=ROOT, env=admin_env(stack), capture_output=True,
                                         text=True, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "resuming incident" in result.stdout
        assert await conn.fetchval("SELECT count(*) FROM incident_accounts WHERE incident_id = $1", incident) == 1000
        assert await conn.fetchval("SELECT flagged FROM incidents WHERE id = $1", incident) == 1000
        flagged = await conn.fetchval("SELECT count(*) FROM accounts WHERE reset_required_incident = $1", incident)
        assert flagged == 1000
    finally:
        await conn.close()

    def listed(type_: str, field: str) -> list[str]:
        return [a if isinstance(a, str) else a["account_id"] for e in tap.of(type_, incident_id=incident)
                for a in e.data[field]]

    await eventually(lambda: len(listed("accounts.reset_required", "accounts")) >= 1000, timeout=30)
    await eventually(lambda: len(listed("passwords.changed", "account_ids")) >= 1000, timeout=30)
    await asyncio.sleep(1)
    for type_, field in (("accounts.reset_required", "accounts"), ("passwords.changed", "account_ids")):
        ids = listed(type_, field)
        assert len(ids) == len(set(ids)) == 1000, type_


async def test_reset_requested_during_a_mass_mailing_arrives_within_seconds(stack: Stack, tmp_path: Path) -> None:
    names = await seed_accounts(stack, 300, uuid.uuid4().hex[:6])
    accounts_file = tmp_path / "mass.txt"
    accounts_file.write_text("\n".join(names) + "\n")
    person = await sign_up(stack)
    result = await run_admin(stack, "force-reset", "--incident", f"mail-{uuid.uuid4().hex[:6]}", "--accounts-file",
                             str(accounts_file), "--notify", "--wait", "0")
    assert result.returncode == 0, result.stderr
    await eventually(lambda: len(list(stack.mail_dir.glob("*.eml"))) > 0, timeout=10)
    started = time.monotonic()
    status, _, _ = await edge_json(stack, "POST", "/api/v2/users/password/reset", data={"email": person["email"]})
    assert status == 204
    await eventually(lambda: mails(stack.mail_dir, person["email"]), timeout=5, interval=0.1)
    assert time.monotonic() - started < 5
    conn = await asyncpg.connect(with_database(stack.database_url,
                                               f"{stack.extra_env['DB_NAME_PREFIX']}hearth_notification"))
    try:
        pending = await conn.fetchval("SELECT count(*) FROM deliveries WHERE kind = 'reset_required'"
                                      " AND status <> 'sent'")
    finally:
        await conn.close()
    assert pending > 0, "the mass mailing was still going on"


async def test_revoke_sessions_for_one_account(stack: Stack) -> None:
    a = await sign_up(stack)
    _, body, _ = await sign_in(stack, a["username"], client="one")
    _, body2, _ = await sign_in(stack, a["username"], client="two")
    result = await run_admin(stack, "revoke-sessions", "--account", a["email"], "--reason", "lost phone")
    # sign-up (the "tests" client) plus two sign-ins
    assert result.returncode == 0 and "3 sessions revoked" in result.stdout, result.stdout + result.stderr
    await eventually(lambda: refused_everywhere(stack, [body["authToken"], body2["authToken"]]), timeout=3)
    assert (await sign_in(stack, a["username"], PASSWORD))[0] == 201
    creds = await run_admin(stack, "holder-credentials", "alpha")
    assert creds.returncode == 0 and len(creds.stdout.strip()) == 43
