"""Issue 16, finding 5, for the web pages: every POST of the web that calls another service, tried
while the service it reaches (directly or through linkcode or auth) is really stopped. Each answers
a page with a 4xx or 503 (never a redirect that pretends it worked, never a 500), leaves nothing half
done (checked in the owning service's tables), and does what it was asked once it is retried.

The browsers load their pages just before each outage: the web's holder then answers from its cache
while devicesession is down, as it would for a session it saw moments ago.
"""

from __future__ import annotations

import re
import time
import uuid

import aiohttp
import pyotp
import pytest

from deploy.launcher import Stack
from tests.auth.test_auth import PASSWORD, sign_in, sign_up
from tests.security.helpers import CSRF, call, db, fresh_address, session_from
from tests.security.test_no_partial_effects import down

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]


class Browser:
    """A browser on its own loopback address, signed in through the web's own sign-in form."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.http = session_from(fresh_address())

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.stack.edge_url + path, allow_redirects=False) as r:
            return r.status, await r.text()

    async def csrf(self, path: str) -> str:
        status, text = await self.get(path)
        assert status == 200, (path, status)
        found = CSRF.search(text)
        assert found, text
        return found.group(1)

    async def post(self, path: str, data: dict[str, str], *, form: str | None = None
                   ) -> tuple[int, str, aiohttp.ClientResponse]:
        """POST ``data`` with the CSRF token of the page at ``form`` (default: ``path``)."""
        token = await self.csrf(form or path)
        async with self.http.post(self.stack.edge_url + path, data={"csrf_token": token, **data},
                                  allow_redirects=False) as r:
            return r.status, await r.text(), r

    async def post_with(self, token: str, path: str, data: dict[str, str]) -> tuple[int, str, aiohttp.ClientResponse]:
        """POST with a CSRF token taken earlier (the page was loaded before the outage)."""
        async with self.http.post(self.stack.edge_url + path, data={"csrf_token": token, **data},
                                  allow_redirects=False) as r:
            return r.status, await r.text(), r

    async def sign_in(self, login: str) -> None:
        status, _, r = await self.post("/signin", {"login": login, "password": PASSWORD})
        assert status == 303 and r.headers["Location"] == "/account", status

    def session_cookie(self) -> str | None:
        for cookie in self.http.cookie_jar:
            if cookie.key == "hearth_session":
                return cookie.value
        return None

    async def close(self) -> None:
        await self.http.close()


def refused_page(status: int, text: str, r: aiohttp.ClientResponse) -> bool:
    """A clear refusal in the web's shape: a 4xx or 503 HTML page, no internals."""
    return (400 <= status < 500 or status == 503) and r.content_type == "text/html" and "Traceback" not in text


async def account_id(stack: Stack, username: str) -> uuid.UUID:
    auth = await db(stack, "auth")
    try:
        found: uuid.UUID = await auth.fetchval("SELECT id FROM accounts WHERE username = $1", username)
        return found
    finally:
        await auth.close()


async def live_sessions(stack: Stack, account: uuid.UUID) -> set[uuid.UUID]:
    ds = await db(stack, "devicesession")
    try:
        rows = await ds.fetch("SELECT id FROM sessions WHERE account_id = $1 AND revoked_at IS NULL", account)
        return {r["id"] for r in rows}
    finally:
        await ds.close()


async def api_status(stack: Stack, token: str) -> int:
    return (await call(stack, "GET", "/api/v2/user", headers={"X-Plex-Token": token}))[0]


async def test_web_posts_failing_inside_devicesession_leave_nothing_and_succeed_when_retried(stack: Stack) -> None:
    owner = await sign_up(stack)
    acct = await account_id(stack, owner["username"])
    # Two more sessions of the owner, on devices of their own: one to remove, one to sign out.
    _, body, _ = await sign_in(stack, owner["username"], client=f"rm-{uuid.uuid4().hex[:6]}")
    removable = body["authToken"]
    _, body, _ = await sign_in(stack, owner["username"], client=f"so-{uuid.uuid4().hex[:6]}")
    other = body["authToken"]
    ds = await db(stack, "devicesession")
    try:
        device = await ds.fetchval("SELECT d.id FROM devices d JOIN sessions s ON s.device_id = d.id"
                                   " WHERE d.account_id = $1 AND d.client_identifier LIKE 'rm-%'", acct)
    finally:
        await ds.close()
    # What the owner will approve: an RFC 8628 device code, a PIN, a strong PIN of the auth app.
    _, dc, _ = await call(stack, "POST", "/oauth/device/code", data={"client_id": "web-partial-tv"})
    _, pin, _ = await call(stack, "POST", "/api/v2/pins",
                           headers={"X-Plex-Client-Identifier": f"tv-{uuid.uuid4().hex[:8]}"})
    app_client = f"app-{uuid.uuid4().hex[:8]}"
    _, strong, _ = await call(stack, "POST", "/api/v2/pins?strong=true", headers={"X-Plex-Client-Identifier": app_client})

    # Someone turning on two-step verification with "sign out all other devices".
    second = await sign_up(stack)
    _, body, _ = await sign_in(stack, second["username"], client=f"b-{uuid.uuid4().hex[:6]}")
    second_other = body["authToken"]

    owner_web, tf_web, leaving, arriving = (Browser(stack) for _ in range(4))
    try:
        await owner_web.sign_in(owner["username"])
        await tf_web.sign_in(second["username"])
        await leaving.sign_in(owner["username"])
        leaving_token = leaving.session_cookie()
        assert leaving_token
        status, text, _ = await tf_web.post("/account/two-factor/start", {}, form="/account")
        assert status == 200, text
        secret = re.search(r'name="secret" value="([A-Z2-7]+)"', text).group(1)  # type: ignore[union-attr]
        auth_query = f"/auth?clientID={app_client}&code={strong['code']}"

        # Every page loaded (and every session cached by the web and by auth) just before the outage.
        link_csrf = await owner_web.csrf("/link")
        auth_csrf = await owner_web.csrf(auth_query)
        account_csrf = await owner_web.csrf("/account")
        tf_csrf = await tf_web.csrf("/account")
        await leaving.csrf("/account")  # auth caches the session too (the sign-out goes through auth)
        leaving_csrf = await leaving.csrf("/signout")
        signin_csrf = await arriving.csrf("/signin")
        before = await live_sessions(stack, acct)
        async with down(stack, "devicesession"):
            # /link/approve: web -> linkcode -> devicesession (the session minted for the code)
            for code in (dc["user_code"], pin["code"]):
                status, text, r = await owner_web.post_with(link_csrf, "/link/approve", {"code": code})
                assert refused_page(status, text, r), (code, status, text)
            # /auth (the auth app's Approve): web -> linkcode -> devicesession
            status, text, r = await owner_web.post_with(auth_csrf, "/auth", {
                "clientID": app_client, "code": strong["code"], "decision": "approve"})
            assert refused_page(status, text, r), (status, text)
            # /account/devices/<id>/remove: web -> devicesession
            status, text, r = await owner_web.post_with(account_csrf, f"/account/devices/{device}/remove", {})
            assert refused_page(status, text, r), (status, text)
            # /account/signout-others: web -> devicesession
            status, text, r = await owner_web.post_with(account_csrf, "/account/signout-others", {})
            assert refused_page(status, text, r), (status, text)
            # /account/two-factor/confirm with sign-out: web -> auth, then web -> devicesession. Two-step
            # verification is on once auth confirmed, so the one-time recovery codes are shown anyway,
            # with what did not happen.
            status, text, r = await tf_web.post_with(tf_csrf, "/account/two-factor/confirm", {
                "secret": secret, "code": pyotp.TOTP(secret).now(), "signOutOthers": "true"})
            assert status == 503 and 'id="recovery-codes"' in text, (status, text)
            assert "could not be signed out" in text
            # /signout: web -> auth -> devicesession. The session lives on, so the browser is not told
            # it signed out, and keeps its cookie for the retry.
            status, text, r = await leaving.post_with(leaving_csrf, "/signout", {})
            assert refused_page(status, text, r), (status, text)
            assert leaving.session_cookie() == leaving_token
            # /signin: web -> auth -> devicesession (the session minted for the browser)
            status, text, r = await arriving.post_with(signin_csrf, "/signin", {
                "login": owner["username"], "password": PASSWORD})
            assert refused_page(status, text, r) and arriving.session_cookie() is None, (status, text)

        # Nothing was done half: no session minted, none revoked, no code used up, no device removed.
        assert await live_sessions(stack, acct) == before
        lc = await db(stack, "linkcode")
        try:
            assert await lc.fetchval("SELECT status FROM device_codes WHERE client_id = 'web-partial-tv'"
                                     " ORDER BY id DESC LIMIT 1") == "pending"
            assert await lc.fetchval("SELECT count(*) FROM pins WHERE id = ANY($1::bigint[]) AND linked_at IS NULL"
                                     " AND expires_at > now()", [pin["id"], strong["id"]]) == 2
        finally:
            await lc.close()
        ds = await db(stack, "devicesession")
        try:
            assert await ds.fetchval("SELECT removed_at FROM devices WHERE id = $1", device) is None
        finally:
            await ds.close()

        # Each succeeds when retried.
        for code in (dc["user_code"], pin["code"]):
            status, text, _ = await owner_web.post("/link/approve", {"code": code}, form="/link")
            assert status == 200 and "is now linked" in text, (code, status, text)
        status, body, _ = await call(stack, "POST", "/oauth/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": dc["device_code"],
            "client_id": "web-partial-tv"})
        assert status == 200 and body["access_token"], body
        status, text, _ = await owner_web.post("/auth", {"clientID": app_client, "code": strong["code"],
                                                         "decision": "approve"}, form=auth_query)
        assert status == 200 and 'id="auth-done"' in text, (status, text)
        status, _, r = await leaving.post("/signout", {})
        assert status == 303 and r.headers["Location"] == "/signin"
        assert await api_status(stack, leaving_token) == 401
        status, text, _ = await owner_web.post(f"/account/devices/{device}/remove", {}, form="/account")
        assert status == 200 and "The device was removed and signed out." in text, text
        assert await api_status(stack, removable) == 401
        status, text, _ = await owner_web.post("/account/signout-others", {}, form="/account")
        assert status == 200 and "signed out." in text, text
        assert await api_status(stack, other) == 401
        # The part of the two-step confirmation that failed is its own idempotent button.
        assert await api_status(stack, second_other) == 200
        status, text, _ = await tf_web.post("/account/signout-others", {}, form="/account")
        assert status == 200 and re.search(r"[1-9]\d* other sessions? signed out\.", text), text
        assert await api_status(stack, second_other) == 401
        status, _, r = await arriving.post("/signin", {"login": owner["username"], "password": PASSWORD})
        assert status == 303 and arriving.session_cookie(), status
    finally:
        for b in (owner_web, tf_web, leaving, arriving):
            await b.close()


async def test_web_posts_failing_inside_linkcode_leave_nothing_and_succeed_when_retried(stack: Stack) -> None:
    owner = await sign_up(stack)
    _, dc, _ = await call(stack, "POST", "/oauth/device/code", data={"client_id": "web-partial-lc"})
    browser = Browser(stack)
    try:
        await browser.sign_in(owner["username"])
        link_csrf = await browser.csrf("/link")
        await browser.csrf("/account")
        async with down(stack, "linkcode"):
            status, text, r = await browser.post_with(link_csrf, "/link", {"code": dc["user_code"]})
            assert refused_page(status, text, r), (status, text)
            status, text, r = await browser.post_with(link_csrf, "/link/approve", {"code": dc["user_code"]})
            assert refused_page(status, text, r), (status, text)
            # /claim: web -> linkcode (the claim token is minted and recorded there)
            status, text = await browser.get("/claim")
            assert status == 503 and "claim-" not in text, (status, text)
        lc = await db(stack, "linkcode")
        try:
            assert await lc.fetchval("SELECT status FROM device_codes WHERE client_id = 'web-partial-lc'"
                                     " ORDER BY id DESC LIMIT 1") == "pending"
        finally:
            await lc.close()
        status, text, _ = await browser.post("/link/approve", {"code": dc["user_code"]}, form="/link")
        assert status == 200 and "is now linked" in text, text
        status, text = await browser.get("/claim")
        assert status == 200 and "claim-" in text, (status, text)
    finally:
        await browser.close()


def _code_at(secret: str, offset: int) -> str:
    totp = pyotp.TOTP(secret)
    return totp.generate_otp(int(time.time() // 30) + offset)


async def test_second_step_failing_inside_devicesession_succeeds_when_retried(stack: Stack) -> None:
    person = await sign_up(stack)
    _, body, _ = await sign_in(stack, person["username"], client=f"tf-{uuid.uuid4().hex[:6]}")
    token = body["authToken"]
    status, body, _ = await call(stack, "POST", "/api/v2/user/two-factor", headers={"X-Plex-Token": token})
    secret = body["secret"]
    status, body, _ = await call(stack, "PUT", "/api/v2/user/two-factor", data={"code": _code_at(secret, -1)},
                                 headers={"X-Plex-Token": token})
    assert status == 200, body
    browser = Browser(stack)
    try:
        status, text, _ = await browser.post("/signin", {"login": person["username"], "password": PASSWORD})
        assert status == 200 and 'action="/signin/code"' in text, text
        csrf = CSRF.search(text).group(1)  # type: ignore[union-attr]
        code = _code_at(secret, 0)
        async with down(stack, "devicesession"):
            status, text, r = await browser.post_with(csrf, "/signin/code", {"code": code})
            assert refused_page(status, text, r), (status, text)
        status, _, r = await browser.post_with(csrf, "/signin/code", {"code": code})
        assert status == 303 and browser.session_cookie(), status
    finally:
        await browser.close()


async def test_web_posts_failing_inside_auth_leave_nothing_and_succeed_when_retried(stack: Stack) -> None:
    """The account pages that only call auth: one call, so a failure writes nothing; each answers
    503 in its page's shape (HTML, or JSON for the passkey script) and works once auth is back."""
    person = await sign_up(stack)
    browser = Browser(stack)
    try:
        await browser.sign_in(person["username"])
        csrf = await browser.csrf("/account")
        forgot_csrf = await browser.csrf("/forgot")
        change = {"currentPassword": PASSWORD, "password": PASSWORD + " again", "confirm": PASSWORD + " again"}
        async with down(stack, "auth"):
            for path, data in (("/account/password", change), ("/account/two-factor/start", {}),
                               ("/account/passkeys/1/remove", {})):
                status, text, r = await browser.post_with(csrf, path, data)
                assert refused_page(status, text, r), (path, status, text)
            status, text, r = await browser.post_with(forgot_csrf, "/forgot", {"email": person["email"]})
            assert refused_page(status, text, r) and "sent" not in text.lower(), (status, text)
            for path in ("/account/passkeys/options", "/signin/passkey/options"):
                status, text, r = await browser.post_with(csrf, path, {})
                assert status == 503 and r.content_type == "application/json" and '"error"' in text, (path, text)
        # The password is unchanged: the old one still signs in.
        assert (await sign_in(stack, person["username"]))[0] == 201
        status, text, _ = await browser.post("/account/password", change, form="/account")
        assert status == 200 and "Your password was changed." in text, text
        status, text, _ = await browser.post("/account/two-factor/start", {}, form="/account")
        assert status == 200 and 'name="secret"' in text, text
        status, text, _ = await browser.post("/account/passkeys/1/remove", {}, form="/account")
        assert status == 200 and "That passkey was already removed." in text, text
        status, text, _ = await browser.post("/forgot", {"email": person["email"]})
        assert status == 200, text
        status, text, _ = await browser.post("/account/passkeys/options", {}, form="/account")
        assert status == 200 and "challenge" in text, text
    finally:
        await browser.close()
