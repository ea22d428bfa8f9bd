"""Issue 16, finding 1: no credential minted from a session outlives "Sign out connected devices".

One test per credential kind listed in the README ("Security: what a revocation voids"): each one
is taken from a session before the password change (with sign-out) and must be dead right after
the change's answer, without waiting for anything.
"""

from __future__ import annotations

import re
import uuid

import pytest

from deploy.launcher import Stack
from tests.auth.test_auth import PASSWORD, sign_in, sign_up, user_status
from tests.conftest import eventually
from tests.notification.test_notification import body_text, mails
from tests.security.helpers import CSRF, call, fresh_address, session_from

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]
NEW_PASSWORD = "a brand new passphrase 42"
GRANT = "urn:ietf:params:oauth:grant-type:device_code"


async def signed_in_account(stack: Stack, sessions: int = 1) -> tuple[dict, list[str]]:  # type: ignore[type-arg]
    a = await sign_up(stack)
    tokens = []
    for i in range(sessions):
        status, body, _ = await sign_in(stack, a["username"], client=f"dev-{i}-{uuid.uuid4().hex[:6]}")
        assert status == 201
        tokens.append(body["authToken"])
    return a, tokens


async def change_with_sign_out(stack: Stack, token: str, current: str = PASSWORD) -> int:
    status, _, headers = await call(stack, "PUT", "/api/v2/user/password", headers={"X-Plex-Token": token},
                                    data={"currentPassword": current, "password": NEW_PASSWORD,
                                          "signOutDevices": "1"})
    assert status == 204
    return int(headers["X-Hearth-Sessions-Revoked"])


async def test_claim_token_is_void_after_sign_out_devices(stack: Stack) -> None:
    """The probe's reproduction: a stolen session takes a claim token; the owner changes the password
    with signOutDevices=1; the claim exchange must fail and mint nothing."""
    a, (owner, thief, *_) = await signed_in_account(stack, sessions=5)
    status, body, _ = await call(stack, "GET", "/api/claim/token.json", headers={"X-Plex-Token": thief})
    assert status == 200
    claim = body["token"]
    revoked = await change_with_sign_out(stack, owner)
    assert revoked == 5  # the sign-up's session and the four others: all but the one that changed it
    status, body, _ = await call(stack, "POST", f"/api/claim/exchange?token={claim}",
                                 headers={"X-Plex-Client-Identifier": f"srv-{uuid.uuid4().hex[:8]}",
                                          "X-Plex-Product": "Plex Media Server", "X-Plex-Provides": "server"})
    assert status == 400 and body["errors"][0]["code"] == 1123, body
    # A claim token of the surviving session still works: the rule voids only what was revoked.
    status, body, _ = await call(stack, "GET", "/api/claim/token.json", headers={"X-Plex-Token": owner})
    status, body, _ = await call(stack, "POST", f"/api/claim/exchange?token={body['token']}",
                                 headers={"X-Plex-Client-Identifier": f"srv-{uuid.uuid4().hex[:8]}"})
    assert status == 200 and await user_status(stack, body["authToken"]) == 200


async def test_linked_pin_not_yet_collected_is_void(stack: Stack) -> None:
    a, (owner, thief) = await signed_in_account(stack, sessions=2)
    cid = f"tv-{uuid.uuid4().hex[:8]}"
    status, pin, _ = await call(stack, "POST", "/api/v2/pins", headers={"X-Plex-Client-Identifier": cid})
    assert status == 201
    status, _, _ = await call(stack, "PUT", "/api/v2/pins/link", data={"code": pin["code"]},
                              headers={"X-Plex-Token": thief})
    assert status == 204
    await change_with_sign_out(stack, owner)
    status, body, _ = await call(stack, "GET", f"/api/v2/pins/{pin['id']}", headers={"X-Plex-Client-Identifier": cid})
    if status == 200 and body.get("authToken"):  # collected in the milliseconds before linkcode applied it
        assert await user_status(stack, body["authToken"]) == 401
    else:
        assert status == 404, body


async def test_approved_device_code_not_yet_polled_is_void(stack: Stack) -> None:
    a, (owner, thief) = await signed_in_account(stack, sessions=2)
    status, dc, _ = await call(stack, "POST", "/oauth/device/code", data={"client_id": "tv-app"})
    assert status == 200
    status, _, _ = await call(stack, "PUT", "/api/v2/pins/link", data={"code": dc["user_code"]},
                              headers={"X-Plex-Token": thief})
    assert status == 204
    await change_with_sign_out(stack, owner)
    status, body, _ = await call(stack, "POST", "/oauth/token",
                                 data={"grant_type": GRANT, "device_code": dc["device_code"], "client_id": "tv-app"})
    assert status == 400 and body["error"] in ("access_denied", "invalid_grant"), body


async def test_pending_reset_links_are_void_after_a_reset_and_after_a_change(stack: Stack) -> None:
    a, (token,) = await signed_in_account(stack)
    for _ in range(2):
        status, _, _ = await call(stack, "POST", "/api/v2/users/password/reset", data={"email": a["email"]},
                                  source=fresh_address())
        assert status == 204
    got = await eventually(lambda: (m := mails(stack.mail_dir, a["email"])) and len(m) >= 2 and m, timeout=15)
    links = [re.search(r"/reset\?token=(\S+)", body_text(m)).group(1) for m in got[:2]]  # type: ignore[union-attr]
    status, _, _ = await call(stack, "PUT", "/api/v2/users/password",
                              data={"resetToken": links[0], "password": NEW_PASSWORD, "signOutDevices": "1"})
    assert status == 204
    assert await user_status(stack, token) == 401
    status, body, _ = await call(stack, "PUT", "/api/v2/users/password",
                                 data={"resetToken": links[1], "password": "attacker chosen 999", "signOutDevices": "0"})
    assert status == 400 and body["errors"][0]["code"] == 1113

    # A change made while signed in voids links asked for before it too.
    b, (btoken,) = await signed_in_account(stack)
    await call(stack, "POST", "/api/v2/users/password/reset", data={"email": b["email"]}, source=fresh_address())
    msg = (await eventually(lambda: mails(stack.mail_dir, b["email"]), timeout=15))[0]
    link = re.search(r"/reset\?token=(\S+)", body_text(msg)).group(1)  # type: ignore[union-attr]
    await change_with_sign_out(stack, btoken)
    status, body, _ = await call(stack, "PUT", "/api/v2/users/password",
                                 data={"resetToken": link, "password": "attacker chosen 999"})
    assert status == 400 and body["errors"][0]["code"] == 1113


async def test_web_csrf_token_of_a_revoked_session_is_refused(stack: Stack) -> None:
    """A thief holding a browser's cookies and a form token taken while signed in cannot post any
    form with them once the session is revoked."""
    a, (owner,) = await signed_in_account(stack)
    async with session_from(fresh_address()) as browser:
        async with browser.get(stack.edge_url + "/signin") as r:
            csrf = CSRF.search(await r.text()).group(1)  # type: ignore[union-attr]
        async with browser.post(stack.edge_url + "/signin", allow_redirects=False,
                                data={"csrf_token": csrf, "login": a["username"], "password": PASSWORD}) as r:
            assert r.status == 303
        async with browser.get(stack.edge_url + "/account") as r:
            assert r.status == 200
            signed_in_csrf = CSRF.search(await r.text()).group(1)  # type: ignore[union-attr]
        await change_with_sign_out(stack, owner)

        async def web_sees_it_revoked() -> bool:  # web's holder applies the revocation within milliseconds
            async with browser.get(stack.edge_url + "/account", allow_redirects=False) as r:
                return r.status == 303

        await eventually(web_sees_it_revoked, timeout=5)
        async with browser.post(stack.edge_url + "/forgot", data={"csrf_token": signed_in_csrf,
                                                                  "email": a["email"]}) as r:
            assert r.status == 403
        # The same browser, signed out, gets a fresh token that works.
        async with browser.get(stack.edge_url + "/forgot") as r:
            fresh = CSRF.search(await r.text()).group(1)  # type: ignore[union-attr]
        assert fresh != signed_in_csrf
        async with browser.post(stack.edge_url + "/forgot", data={"csrf_token": fresh, "email": a["email"]}) as r:
            assert r.status == 200


async def test_session_tokens_and_exchanged_server_tokens_are_void(stack: Stack) -> None:
    """The sessions themselves, and a server token that a claim exchange minted before the change."""
    a, (owner, thief) = await signed_in_account(stack, sessions=2)
    status, body, _ = await call(stack, "GET", "/api/claim/token.json", headers={"X-Plex-Token": thief})
    status, body, _ = await call(stack, "POST", f"/api/claim/exchange?token={body['token']}",
                                 headers={"X-Plex-Client-Identifier": f"srv-{uuid.uuid4().hex[:8]}"})
    assert status == 200
    server = body["authToken"]
    await change_with_sign_out(stack, owner)
    for token in (thief, server):
        for path in ("/api/v2/user", "/devices.json", "/api/v2/resources.json", "/api/claim/token.json"):
            status, _, _ = await call(stack, "GET", path, headers={"X-Plex-Token": token})
            assert status == 401, (path, status)
