"""Breach response at scale: 1,000,000 accounts with 3,000,000 sessions (seeded through SQL), then
``hearth admin force-reset --all --sign-out-devices --notify``. Reports the time from the command's
start until every account is flagged (the command's own run), every session is revoked
(devicesession), every running sample holder has applied every revocation, and every email is
queued (notification); and the peak memory of each process. To show memory is flat in the number
of accounts, the same command first runs on a 100,000-account incident.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import asyncpg

from bench.common import CpuMeter, Row, service_db
from deploy.launcher import ROOT, Stack
from shared.passwords import Passwords

NAME = "breach"
ACCOUNTS = int(os.environ.get("BENCH_BREACH_ACCOUNTS", "1000000"))
SESSIONS_PER_ACCOUNT = 3
SMALL = ACCOUNTS // 10


async def seed(stack: Stack) -> None:
    pw = Passwords()
    record = await pw.hash("breach bench password")
    pw.close()
    auth = await asyncpg.connect(service_db(stack, "auth"))
    try:
        # the first tenth is older: a --created-before incident selects exactly those
        await auth.execute(
            "INSERT INTO accounts (id, email, email_norm, username, username_norm, password_hash, created_at)"
            " SELECT md5('acct' || g)::uuid, 'b' || g || '@example.org', 'b' || g || '@example.org', 'b' || g,"
            " 'b' || g, $1, CASE WHEN g <= $3 THEN timestamptz '2020-01-01' ELSE timestamptz '2021-01-01' END"
            " FROM generate_series(1, $2) g",
            record, ACCOUNTS, SMALL)
        await auth.execute("ANALYZE accounts")
    finally:
        await auth.close()
    ds = await asyncpg.connect(service_db(stack, "devicesession"))
    try:
        await ds.execute(
            "INSERT INTO devices (account_id, client_identifier, product, device_name)"
            " SELECT md5('acct' || g)::uuid, 'dev' || d, 'Bench', 'dev' || d"
            " FROM generate_series(1, $1) g, generate_series(1, $2) d",
            ACCOUNTS, SESSIONS_PER_ACCOUNT)
        await ds.execute(
            "INSERT INTO sessions (id, token_hmac, account_id, device_id)"
            " SELECT md5('s' || id)::uuid, sha256(('t' || id)::bytea), account_id, id FROM devices"
            " WHERE product = 'Bench'")
        await ds.execute("ANALYZE devices; ANALYZE sessions")
    finally:
        await ds.close()


def peak_rss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):  # noqa: SIM115
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_command(stack: Stack, *args: str, meter: CpuMeter | None = None) -> tuple[float, float, str]:
    """Run ``hearth admin``; returns (seconds, peak RSS MiB of the command, output)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "admin", *args], cwd=ROOT,
                            env={**stack.env, "SERVICE_NAME": "auth"}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    peak = 0.0
    while proc.poll() is None:
        value = peak_rss_mib(proc.pid)
        if value == value:  # not NaN
            peak = max(peak, value)
        if meter is not None:
            meter.sample()
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(out)
    return time.monotonic() - t0, peak, out


async def wait_until(check, timeout: float = 900.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await check():
            return time.monotonic()
        await asyncio.sleep(0.25)
    raise TimeoutError("not reached")


def provider_paced_notification(stack: Stack, rate: str = "50") -> None:
    """Restart notification with a provider-like send rate: the mass mailing is paced as in
    production instead of competing for the 2 cores at the sink's full speed."""
    from deploy.launcher import spawn

    old = next(c for c in stack.children if c.name == "notification")
    old.stop()
    stack.children.remove(old)
    env = {**stack.service_env("notification", stack.ports["notification"]), "SMTP_RATE": rate}
    child = spawn("notification", [sys.executable, "-m", "services.notification"], stack.out, env=env, cwd=ROOT)
    stack.children.append(child)
    stack.wait_ready(stack.ports["notification"], "notification", child)


async def run(stack: Stack) -> list[Row]:
    await asyncio.to_thread(provider_paced_notification, stack)
    t_seed = time.monotonic()
    await seed(stack)
    seed_s = time.monotonic() - t_seed
    holders = list(stack.holders)
    rows: list[Row] = [Row(NAME, f"seed {ACCOUNTS:,} accounts + {ACCOUNTS * SESSIONS_PER_ACCOUNT:,} sessions (SQL)",
                           seed_s, "s")]
    small_s, small_rss, _ = await asyncio.to_thread(
        run_command, stack, "force-reset", "--incident", "bench-small", "--created-before", "2020-06-01",
        "--sign-out-devices", "--notify", "--wait", "0")
    ds = await asyncpg.connect(service_db(stack, "devicesession"))
    note = await asyncpg.connect(service_db(stack, "notification"))
    try:
        meter = CpuMeter()
        meter.start()
        started = time.monotonic()
        proc_task = asyncio.create_task(asyncio.to_thread(
            run_command, stack, "force-reset", "--incident", "bench-all", "--all", "--sign-out-devices", "--notify",
            "--wait", "0", meter=meter))
        cmd_s, big_rss, out = await proc_task
        auth = await asyncpg.connect(service_db(stack, "auth"))
        try:
            batches, flagged = await auth.fetchrow("SELECT revocation_events, flagged FROM incidents"
                                                   " WHERE id = 'bench-all'")
        finally:
            await auth.close()

        async def revoked() -> bool:
            r = await ds.fetchrow("SELECT count(*) AS e, coalesce(sum(revoked), 0) AS n FROM revocations"
                                  " WHERE incident_id = 'bench-all'")
            return bool(r["e"] >= batches)

        async def applied() -> bool:
            n = await ds.fetchval(
                "SELECT count(*) FROM revocation_acks a JOIN revocations r ON r.id = a.revocation_id"
                " WHERE r.incident_id = 'bench-all' AND a.holder_id = ANY($1::text[])", holders)
            return bool(n >= batches * len(holders))

        async def queued() -> bool:
            n = await note.fetchval("SELECT count(*) FROM deliveries WHERE incident_id = 'bench-all'")
            return bool(n >= flagged)

        t_revoked = await wait_until(revoked)
        t_applied = await wait_until(applied)
        t_queued = await wait_until(queued)
        cpu = meter.stop()
        # live: not revoked one by one, and not cut off by a bulk revocation of its account
        sessions = await ds.fetchval(
            "SELECT count(*) FROM sessions s WHERE s.revoked_at IS NULL AND s.account_id IN"
            " (SELECT md5('acct' || g)::uuid FROM generate_series(1, $1) g) AND NOT EXISTS"
            " (SELECT 1 FROM account_cutoffs c WHERE c.account_id = s.account_id AND c.revoked_before >= s.created_at)",
            ACCOUNTS)
    finally:
        await ds.close()
        await note.close()
    total = max(t_revoked, t_applied, t_queued) - started
    rows += [
        Row(NAME, f"flag {flagged:,} accounts (command run)", cmd_s, "s"),
        Row(NAME, f"every session revoked (devicesession, {batches:,} revocations)", t_revoked - started, "s"),
        Row(NAME, f"every revocation applied by {len(holders)} holders", t_applied - started, "s"),
        Row(NAME, "every email queued (notification)", t_queued - started, "s"),
        Row(NAME, "all of it", total, "s", goal="< 180 s"),
        Row(NAME, "sessions of selected accounts still live", float(sessions), "", goal="0"),
        Row(NAME, f"command peak RSS, {ACCOUNTS:,} accounts", big_rss, "MiB",
            f"same command, {SMALL:,} accounts", small_rss, "flat"),
    ]
    rows += [Row(NAME, f"CPU of {label} until all done", seconds, "s") for label, seconds in cpu.items()
             if seconds >= 0.5]
    for child in stack.children:
        if child.name in ("auth", "devicesession", "notification", "postgres", "kafka") or child.name == "holder-h00":
            rows.append(Row(NAME, f"peak RSS {child.name}", peak_rss_mib(child.proc.pid), "MiB"))
    del small_s, out
    return rows
