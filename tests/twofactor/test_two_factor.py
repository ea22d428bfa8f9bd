"""Two-step verification on the real stack: the real python-plexapi client, the wire format, storage
in the auth database, the emails in the SMTP sink, password resets and the operator command."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pyotp
import pytest
from plexapi.exceptions import TwoFactorRequired
from plexapi.myplex import MyPlexAccount

from deploy.launcher import Stack
from tests.auth.test_auth import PASSWORD, account_uuid, auth_db, request_reset_token, sign_in, sign_up, user_status
from tests.breach.test_force_reset import run_admin
from tests.conftest import EventTap, edge_json, eventually
from tests.notification.test_notification import body_text, mails
from tests.plexclient import plex_session

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


def code(secret: str, step: int) -> str:
    return pyotp.TOTP(secret).generate_otp(step)


def now_step() -> int:
    return int(time.time() // 30)


async def enroll(stack: Stack, token: str) -> tuple[str, list[str], int]:
    """Start and confirm enrollment; returns (secret, recovery codes, the time step used to confirm)."""
    status, body, _ = await edge_json(stack, "POST", "/api/v2/user/two-factor", headers={"X-Plex-Token": token})
    assert status == 201, body
    secret = body["secret"]
    step = now_step()
    status, body, _ = await edge_json(stack, "PUT", "/api/v2/user/two-factor", data={"code": code(secret, step)},
                                      headers={"X-Plex-Token": token})
    assert status == 200, body
    assert len(body["recoveryCodes"]) == 10 and len(set(body["recoveryCodes"])) == 10
    return secret, body["recoveryCodes"], step


async def account_with_2fa(stack: Stack) -> tuple[dict, str, list[str], int]:  # type: ignore[type-arg]
    a = await sign_up(stack)
    _, body, _ = await sign_in(stack, a["username"])
    secret, codes, step = await enroll(stack, body["authToken"])
    return a, secret, codes, step


def plex_account(stack: Stack, username: str, password: str, code: str | None = None) -> MyPlexAccount:
    return MyPlexAccount(username, password, session=plex_session(stack.edge_url), code=code)


def kinds(stack: Stack, to: str, kind: str) -> list:  # type: ignore[type-arg]
    return [m for m in mails(stack.mail_dir, to) if m["X-Hearth-Kind"] == kind]


async def exactly_one_email(stack: Stack, to: str, kind: str) -> str:
    await eventually(lambda: kinds(stack, to, kind), timeout=30)
    await asyncio.sleep(1.5)  # a duplicate would have arrived by now
    found = kinds(stack, to, kind)
    assert len(found) == 1, [m["Subject"] for m in found]
    return body_text(found[0])


async def test_enrollment_api_and_user_shapes(stack: Stack) -> None:
    a = await sign_up(stack)
    _, body, _ = await sign_in(stack, a["username"])
    token = body["authToken"]
    assert body["twoFactorEnabled"] is False and body["backupCodesCreated"] is False
    # confirm before start: 400 with its own code
    status, err, _ = await edge_json(stack, "PUT", "/api/v2/user/two-factor", data={"code": "123456"},
                                     headers={"X-Plex-Token": token})
    assert status == 400 and err["errors"][0]["code"] == 1118
    status, started, _ = await edge_json(stack, "POST", "/api/v2/user/two-factor", headers={"X-Plex-Token": token})
    assert status == 201
    assert started["uri"] == f"otpauth://totp/Hearth:{a['username']}?secret={started['secret']}&issuer=Hearth"
    assert len(pyotp.TOTP(started["secret"]).byte_secret()) == 20
    # nothing is enabled yet: sign-in needs no code
    status, body, _ = await sign_in(stack, a["username"])
    assert status == 201 and body["twoFactorEnabled"] is False
    # a wrong code enables nothing
    wrong = "000000" if code(started["secret"], now_step()) != "000000" else "111111"
    status, err, _ = await edge_json(stack, "PUT", "/api/v2/user/two-factor", data={"code": wrong},
                                     headers={"X-Plex-Token": token})
    assert status == 401 and err["errors"][0]["code"] == 1029
    status, body, _ = await sign_in(stack, a["username"])
    assert status == 201
    # the right one does, once
    step = now_step()
    status, confirmed, _ = await edge_json(stack, "PUT", "/api/v2/user/two-factor",
                                           data={"code": code(started["secret"], step)},
                                           headers={"X-Plex-Token": token})
    assert status == 200 and len(confirmed["recoveryCodes"]) == 10
    status, err, _ = await edge_json(stack, "POST", "/api/v2/user/two-factor", headers={"X-Plex-Token": token})
    assert status == 409 and err["errors"][0]["code"] == 1117
    status, user, _ = await edge_json(stack, "GET", "/api/v2/user", headers={"X-Plex-Token": token})
    assert user["twoFactorEnabled"] is True and user["backupCodesCreated"] is True
    status, shown, _ = await edge_json(stack, "GET", "/api/v2/user/two-factor", headers={"X-Plex-Token": token})
    assert shown["enabled"] is True and shown["recoveryCodesLeft"] == 10
    # regenerate: wrong password 401, right password + a recovery code -> 10 new codes, old ones dead
    status, _, _ = await edge_json(stack, "POST", "/api/v2/user/two-factor/recovery-codes",
                                   data={"password": "not the password", "code": confirmed["recoveryCodes"][0]},
                                   headers={"X-Plex-Token": token})
    assert status == 401
    status, fresh, _ = await edge_json(stack, "POST", "/api/v2/user/two-factor/recovery-codes",
                                       data={"password": PASSWORD, "code": confirmed["recoveryCodes"][0]},
                                       headers={"X-Plex-Token": token})
    assert status == 200 and not set(fresh["recoveryCodes"]) & set(confirmed["recoveryCodes"])
    status, err, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": confirmed["recoveryCodes"][1]})
    assert status == 401 and err["errors"][0]["code"] == 1029
    # disable with password + recovery code
    status, _, _ = await edge_json(stack, "DELETE", "/api/v2/user/two-factor",
                                   data={"password": PASSWORD, "code": fresh["recoveryCodes"][0]},
                                   headers={"X-Plex-Token": token})
    assert status == 204
    status, body, _ = await sign_in(stack, a["username"])
    assert status == 201 and body["twoFactorEnabled"] is False
    status, err, _ = await edge_json(stack, "DELETE", "/api/v2/user/two-factor",
                                     data={"password": PASSWORD, "code": "123456"}, headers={"X-Plex-Token": token})
    assert status == 409 and err["errors"][0]["code"] == 1119
    # bad input is a clear 4xx
    for method, path, data in [("PUT", "/api/v2/user/two-factor", {"code": "x" * 100}),
                               ("DELETE", "/api/v2/user/two-factor", {}),
                               ("POST", "/api/v2/user/two-factor/recovery-codes", {"password": "p" * 5000})]:
        status, _, _ = await edge_json(stack, method, path, data=data, headers={"X-Plex-Token": token})
        assert 400 <= status < 500, (method, path, status)
    status, _, _ = await edge_json(stack, "POST", "/api/v2/user/two-factor", headers={"X-Plex-Token": "nope"})
    assert status == 401


async def test_python_plexapi_two_factor_required_code_replay_and_recovery(stack: Stack) -> None:
    a, secret, codes, step = await account_with_2fa(stack)
    with pytest.raises(TwoFactorRequired):
        await asyncio.to_thread(plex_account, stack, a["username"], PASSWORD)
    # the same wire format for every client: 401, 1029, "verification code"
    status, err, _ = await sign_in(stack, a["username"])
    assert status == 401 and err["errors"][0]["code"] == 1029 and "verification code" in err["errors"][0]["message"]
    # the confirming code's step is used up; the next step's code (one step of drift) signs in, once
    account = await asyncio.to_thread(plex_account, stack, a["username"], PASSWORD, code(secret, step + 1))
    assert account.authToken and account.twoFactorEnabled and account.backupCodesCreated
    with pytest.raises(TwoFactorRequired):
        await asyncio.to_thread(plex_account, stack, a["username"], PASSWORD, code(secret, step + 1))
    # so is an older step's code once a newer one was used
    with pytest.raises(TwoFactorRequired):
        await asyncio.to_thread(plex_account, stack, a["username"], PASSWORD, code(secret, step))
    # a recovery code signs in once and never again
    recovered = await asyncio.to_thread(plex_account, stack, a["username"], PASSWORD, codes[3])
    assert await user_status(stack, recovered.authToken) == 200
    with pytest.raises(TwoFactorRequired):
        await asyncio.to_thread(plex_account, stack, a["username"], PASSWORD, codes[3])
    # written differently (upper case, no dash) it is the same code
    spelled = codes[4].replace("-", "").upper()
    assert (await asyncio.to_thread(plex_account, stack, a["username"], PASSWORD, spelled)).authToken
    # a wrong password with a right code is still a wrong password (1001)
    status, err, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": "wrong password", "verificationCode": codes[5]})
    assert status == 401 and err["errors"][0]["code"] == 1001


async def test_password_with_the_digits_appended(stack: Stack) -> None:
    a, secret, _, step = await account_with_2fa(stack)
    status, body, _ = await sign_in(stack, a["username"], PASSWORD + code(secret, step + 1))
    assert status == 201 and body["authToken"]
    status, err, _ = await sign_in(stack, a["username"], PASSWORD + code(secret, step + 1))  # replayed
    assert status == 401 and err["errors"][0]["code"] == 1029
    status, err, _ = await sign_in(stack, a["username"], "wrong password" + code(secret, step + 1))
    assert status == 401 and err["errors"][0]["code"] == 1001


async def test_wrong_codes_are_throttled_with_retry_after(stack: Stack) -> None:
    a, secret, codes, step = await account_with_2fa(stack)
    valid = {code(secret, s) for s in range(step - 2, step + 4)}
    wrong = next(f"{n:06d}" for n in range(1, 999999) if f"{n:06d}" not in valid)
    answers = []
    for _ in range(8):
        status, err, headers = await edge_json(stack, "POST", "/api/v2/users/signin", data={
            "login": a["username"], "password": PASSWORD, "verificationCode": wrong})
        answers.append(status)
        if status == 429:
            assert err["errors"][0]["code"] == 1111
            retry = int(headers["Retry-After"])
            assert 1 <= retry <= 900
            break
        assert status == 401 and err["errors"][0]["code"] == 1029
    assert answers[:5] == [401] * 5 and answers[-1] == 429, answers
    # while blocked even a right code waits
    status, _, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": codes[0]})
    assert status == 429
    await asyncio.sleep(retry + 0.5)
    status, body, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": codes[0]})
    assert status == 201, body
    # the success cleared the budget: wrong codes get 401 again, not 429
    status, _, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": wrong})
    assert status == 401


async def test_concurrent_replays_of_one_code_sign_in_once(stack: Stack) -> None:
    a, secret, _, step = await account_with_2fa(stack)
    c = code(secret, step + 1)
    results = await asyncio.gather(*(edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": c}) for _ in range(4)))
    assert sorted(r[0] for r in results) == [201, 401, 401, 401]


async def test_parallel_wrong_codes_are_held_to_the_code_budget(stack: Stack) -> None:
    """Someone who has the password sends 14 code guesses at once: the code budget (5 free) admits
    at most its free attempts plus one after them, whatever the parallelism; the rest wait, then get
    429 with Retry-After. No guess is checked beyond the budget."""
    a, secret, _, step = await account_with_2fa(stack)
    valid = {code(secret, s) for s in range(step - 2, step + 6)}
    guesses = [g for g in (f"{n:06d}" for n in range(100000, 100100)) if g not in valid][:14]
    results = await asyncio.gather(*(edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": g}) for g in guesses))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(401) <= 6 and statuses.count(401) + statuses.count(429) == 14, statuses
    assert all(int(r[2]["Retry-After"]) >= 1 for r in results if r[0] == 429)


async def test_a_wrong_password_with_a_code_leaves_the_code_budget_alone(stack: Stack) -> None:
    """The code's place is reserved with the password's, and given back uncounted when the password
    is wrong: guessing passwords never spends the owner's code budget. A right code then signs in."""
    a, secret, _, step = await account_with_2fa(stack)
    for _ in range(3):
        status, _, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
            "login": a["username"], "password": "not the password at all", "verificationCode": "123456"})
        assert status == 401
    conn = await auth_db(stack)
    try:
        row = await conn.fetchrow("SELECT hits, pending FROM throttles WHERE scope = $1",
                                  f"2fa:account:{account_uuid(a['id'])}")
    finally:
        await conn.close()
    assert row is None or (row["hits"], row["pending"]) == (0, 0), dict(row)
    status, body, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": code(secret, max(step + 1, now_step()))})
    assert status == 201, body


async def test_no_plaintext_secret_or_recovery_code_in_the_database(stack: Stack) -> None:
    a, secret, codes, _ = await account_with_2fa(stack)
    conn = await auth_db(stack)
    try:
        rows = await conn.fetch("SELECT t::text AS row FROM two_factor t WHERE account_id = $1",
                                account_uuid(a["id"]))
        codes_rows = await conn.fetch("SELECT r::text AS row, code_hmac FROM recovery_codes r WHERE account_id = $1",
                                      account_uuid(a["id"]))
        dump = "\n".join(r["row"] for r in await conn.fetch(
            "SELECT t::text AS row FROM two_factor t UNION ALL SELECT r::text FROM recovery_codes r"))
    finally:
        await conn.close()
    assert len(rows) == 1 and len(codes_rows) == 10
    text = rows[0]["row"]
    assert secret not in text and secret.lower() not in text
    assert pyotp.TOTP(secret).byte_secret().hex() not in text
    assert ",v1.t1." in text  # sealed under the TWO_FACTOR_SEAL_KEYS key "t1"
    for c in codes:
        assert c not in dump and c.replace("-", "") not in dump
    assert all(len(r["code_hmac"]) == 32 for r in codes_rows)


async def test_enable_disable_and_recovery_use_each_send_exactly_one_email(stack: Stack, tap: EventTap) -> None:
    a, secret, codes, step = await account_with_2fa(stack)
    text = await exactly_one_email(stack, a["email"], "two_factor_enabled")
    assert "turned on" in text
    _, body, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": PASSWORD, "verificationCode": codes[0]})
    token = body["authToken"]
    text = await exactly_one_email(stack, a["email"], "recovery_code_used")
    assert "9 unused recovery codes left" in text
    assert tap.of("two_factor.recovery_code_used", account_id=account_uuid(a["id"]))[0].data["codes_left"] == 9
    status, _, _ = await edge_json(stack, "DELETE", "/api/v2/user/two-factor",
                                   data={"password": PASSWORD, "code": code(secret, step + 1)},
                                   headers={"X-Plex-Token": token})
    assert status == 204
    text = await exactly_one_email(stack, a["email"], "two_factor_disabled")
    assert "turned off" in text
    for kind in ("two_factor.enabled", "two_factor.disabled", "two_factor.recovery_code_used"):
        assert len(tap.of(kind, account_id=account_uuid(a["id"]))) == 1, kind


async def test_password_reset_and_forced_reset_leave_two_factor_on(stack: Stack, tap: EventTap) -> None:
    a, secret, codes, _ = await account_with_2fa(stack)
    token = await request_reset_token(stack, tap, a)
    status, _, _ = await edge_json(stack, "PUT", "/api/v2/users/password",
                                   data={"resetToken": token, "password": "another good passphrase"})
    assert status == 204
    status, err, _ = await sign_in(stack, a["username"], "another good passphrase")
    assert status == 401 and err["errors"][0]["code"] == 1029  # the reset did not bypass the second factor
    # a forced reset (breach command) leaves two-step verification as it was
    accounts = Path(stack.run_dir) / f"accounts-{a['username']}.txt"
    accounts.write_text(a["email"] + "\n")
    result = await run_admin(stack, "force-reset", "--incident", f"tf-{a['username']}", "--accounts-file",
                             str(accounts), "--wait", "5")
    assert result.returncode == 0, result.stderr
    status, err, _ = await sign_in(stack, a["username"], "another good passphrase")
    assert status == 401 and err["errors"][0]["code"] == 1029
    status, err, _ = await edge_json(stack, "POST", "/api/v2/users/signin", data={
        "login": a["username"], "password": "another good passphrase", "verificationCode": codes[0]})
    assert status == 403 and err["errors"][0]["code"] == 1110  # then: the reset is required
    conn = await auth_db(stack)
    try:
        assert await conn.fetchval("SELECT enabled_at IS NOT NULL FROM two_factor WHERE account_id = $1",
                                   account_uuid(a["id"]))
    finally:
        await conn.close()


async def test_operator_disables_two_factor_audited_and_emailed(stack: Stack) -> None:
    a, _, _, _ = await account_with_2fa(stack)
    result = await run_admin(stack, "two-factor", "disable", "--account", a["email"], "--reason", "Lost their phone")
    assert result.returncode == 0, result.stderr
    assert "turned off" in result.stdout
    status, body, _ = await sign_in(stack, a["username"])
    assert status == 201 and body["twoFactorEnabled"] is False
    text = await exactly_one_email(stack, a["email"], "two_factor_disabled")
    assert "by an administrator" in text and "Lost their phone" in text
    again = await run_admin(stack, "two-factor", "disable", "--account", a["email"], "--reason", "again")
    assert again.returncode == 1 and "not on" in again.stderr
    missing = await run_admin(stack, "two-factor", "disable", "--account", "nobody@example.org", "--reason", "x")
    assert missing.returncode == 1
    conn = await auth_db(stack)
    try:
        rows = await conn.fetch("SELECT outcome, args FROM admin_audit WHERE action = 'two-factor-disable'"
                                " AND args->>'account' = $1 ORDER BY id", a["email"])
    finally:
        await conn.close()
    assert [r["outcome"] for r in rows] == ["completed", "not enabled"]
    assert json.loads(rows[0]["args"])["reason"] == "Lost their phone"


async def test_unconfirmed_enrollment_expires(stack: Stack) -> None:
    a = await sign_up(stack)
    _, body, _ = await sign_in(stack, a["username"])
    token = body["authToken"]
    _, started, _ = await edge_json(stack, "POST", "/api/v2/user/two-factor", headers={"X-Plex-Token": token})
    conn = await auth_db(stack)
    try:
        await conn.execute("UPDATE two_factor SET pending_expires_at = now() - interval '1 second'"
                           " WHERE account_id = $1", account_uuid(a["id"]))
    finally:
        await conn.close()
    status, err, _ = await edge_json(stack, "PUT", "/api/v2/user/two-factor",
                                     data={"code": code(started["secret"], now_step())},
                                     headers={"X-Plex-Token": token})
    assert status == 400 and err["errors"][0]["code"] == 1118
    status, body, _ = await sign_in(stack, a["username"])
    assert status == 201 and body["twoFactorEnabled"] is False


async def test_a_redelivered_two_factor_event_sends_one_email(stack: Stack) -> None:
    from shared.events import AUTH_EVENTS, TwoFactorRecoveryCodeUsed, envelope, iso, utcnow
    from tests.notification.test_notification import publish

    a = await sign_up(stack)
    acct = account_uuid(a["id"])
    env = envelope(TwoFactorRecoveryCodeUsed(account_id=acct, email=a["email"], username=a["username"],
                                             codes_left=2, used_at=iso(utcnow())), producer="tests", key=acct)
    for _ in range(3):
        await publish(stack.kafka_bootstrap, stack.topic_prefix + AUTH_EVENTS, env)
    text = await exactly_one_email(stack, a["email"], "recovery_code_used")
    assert "2 unused recovery codes left" in text and "Create new ones soon" in text
