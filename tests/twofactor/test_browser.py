"""Two-step verification and passkeys in a real browser (Playwright driving Debian's Chromium) against
the real stack; passkeys through Chromium's virtual authenticator (DevTools WebAuthn domain).

The test stack's edge is http://localhost:PORT (tests/conftest.py): WebAuthn needs a domain as
relying-party id, and PUBLIC_BASE_URL gives it. Screenshots go to artifacts/screenshots/.
"""

from __future__ import annotations

import time

import aiohttp
import pyotp
import pytest
from playwright.async_api import Browser, Page

from deploy.launcher import Stack
from tests.auth.test_auth import auth_db, user_status
from tests.conftest import edge_json, eventually
from tests.web.test_pages import browser, new_page, shot, sign_up_in_browser  # noqa: F401 - the fixture

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


def totp(secret: str, step: int) -> str:
    return pyotp.TOTP(secret).generate_otp(step)


async def sign_out(stack: Stack, page: Page) -> None:
    await page.goto(stack.edge_url + "/signout")
    await page.click("main button[type=submit]")
    await page.wait_for_url("**/signin")


async def password_step(stack: Stack, page: Page, login: str, password: str) -> None:
    await page.goto(stack.edge_url + "/signin")
    await page.fill("#login", login)
    await page.fill("#password", password)
    await page.click("form[action='/signin'] button[type=submit]")


async def test_enroll_with_the_qr_page_then_sign_in_with_the_second_step(stack: Stack, browser: Browser) -> None:  # noqa: F811
    context, page = await new_page(browser)
    user = await sign_up_in_browser(stack, page)
    # another device, signed in through the Plex API: "Sign out all other devices" (ticked) ends it
    status, other, _ = await edge_json(stack, "POST", "/api/v2/users/signin",
                                       data={"login": user["username"], "password": user["password"]})
    assert status == 201
    await page.click("text=Set up two-step verification")
    await page.wait_for_selector("#qr svg")
    await shot(page, "two-factor-qr")
    secret = await page.get_attribute("#totp-secret", "data-secret")
    assert secret and (await page.inner_text("#totp-secret")).replace(" ", "") == secret
    # a wrong code first: the page says so and shows the QR again
    step = int(time.time() // 30)
    wrong = next(f"{n:06d}" for n in range(1, 999) if f"{n:06d}" not in {totp(secret, s) for s in
                                                                        range(step - 1, step + 3)})
    await page.fill("#code", wrong)
    await page.click("text=Turn on two-step verification")
    assert "not right" in await page.inner_text("#code-error")
    await page.wait_for_selector("#qr svg")
    step = int(time.time() // 30)
    await page.fill("#code", totp(secret, step))
    await page.click("text=Turn on two-step verification")
    await page.wait_for_selector("#recovery-codes")
    codes = [c.strip() for c in await page.locator("#recovery-codes code").all_inner_texts()]
    assert len(codes) == 10
    assert "1 other session signed out" in await page.inner_text("main")
    assert await user_status(stack, other["authToken"]) == 401
    await shot(page, "two-factor-recovery-codes")
    async with page.expect_download() as info:
        await page.click("#download-codes")
    download = await info.value
    content = open(await download.path()).read()  # noqa: ASYNC230
    assert all(c in content for c in codes)
    await page.goto(stack.edge_url + "/account")
    assert "On." in await page.inner_text("#two-factor")
    assert "10 unused recovery codes left" in await page.inner_text("#two-factor")
    await shot(page, "two-factor-on")

    await sign_out(stack, page)
    await password_step(stack, page, user["username"], user["password"])
    await page.wait_for_selector("text=Two-step verification")
    assert await page.locator("#password").count() == 0  # the password is not asked again
    await shot(page, "signin-second-step")
    cookies = {c["name"]: c["value"] for c in await context.cookies()}
    pending = cookies["hearth_pending"]
    await page.fill("#code", "000000" if totp(secret, step + 1) != "000000" else "111111")
    await page.click("form[action='/signin/code'] button")
    assert "not right" in await page.inner_text("#code-error")
    await shot(page, "signin-second-step-wrong")
    await page.fill("#code", totp(secret, step + 1))
    await page.click("form[action='/signin/code'] button")
    await page.wait_for_url("**/account")
    assert user["username"] in await page.inner_text("h1")
    await shot(page, "signin-second-step-done")

    # the pending sign-in was single use: replaying its cookie with a valid recovery code fails
    csrf = await page.get_attribute("input[name=csrf_token]", "value")
    async with aiohttp.ClientSession(cookies={"hearth_pending": pending, "hearth_csrf": cookies["hearth_csrf"]}) as h:
        async with h.post(stack.edge_url + "/signin/code", data={"csrf_token": csrf, "code": codes[0]},
                          allow_redirects=False) as r:
            assert r.status == 400 and "expired" in await r.text()
    # ...and that recovery code is still unused: a fresh sign-in takes it
    await sign_out(stack, page)
    await password_step(stack, page, user["email"], user["password"])
    await page.fill("#code", codes[0])
    await page.click("form[action='/signin/code'] button")
    await page.wait_for_url("**/account")
    assert "9 unused recovery codes left" in await page.inner_text("#two-factor")

    # regenerate, then disable, from the page
    await page.fill("#tf-password-new", user["password"])
    await page.fill("#tf-code-new", codes[1])
    await page.click("text=Create new recovery codes")
    await page.wait_for_selector("#recovery-codes")
    fresh = [c.strip() for c in await page.locator("#recovery-codes code").all_inner_texts()]
    assert len(fresh) == 10 and not set(fresh) & set(codes)
    await page.goto(stack.edge_url + "/account")
    await page.fill("#tf-password-off", user["password"])
    await page.fill("#tf-code-off", "wrong-code")
    await page.click("text=Turn off two-step verification")
    assert "not right" in await page.inner_text("#two-factor")
    await page.fill("#tf-password-off", user["password"])
    await page.fill("#tf-code-off", fresh[0])
    await page.click("text=Turn off two-step verification")
    await page.wait_for_selector("text=Two-step verification is off.")
    await shot(page, "two-factor-off")
    await sign_out(stack, page)
    await password_step(stack, page, user["username"], user["password"])
    await page.wait_for_url("**/account")
    await context.close()


async def add_virtual_authenticator(page: Page) -> str:
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    result = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
        "isUserVerified": True, "automaticPresenceSimulation": True}})
    return str(result["authenticatorId"])


async def test_passkeys_register_sign_in_revoke_and_remove(stack: Stack, browser: Browser) -> None:  # noqa: F811
    context, page = await new_page(browser)
    await add_virtual_authenticator(page)
    user = await sign_up_in_browser(stack, page)
    await page.fill("#passkey-name", "Test laptop")
    await page.click("#passkey-add-button")
    await page.wait_for_selector("tr.passkey:has-text('Test laptop')")
    assert "never" in await page.inner_text("tr.passkey")
    await shot(page, "passkey-added")

    # sign in with the passkey: no username typed
    await sign_out(stack, page)
    await shot(page, "signin-with-passkey-button")
    await page.click("#passkey-signin-button")
    await page.wait_for_url("**/account")
    assert user["username"] in await page.inner_text("h1")
    assert "never" not in await page.inner_text("tr.passkey")
    await shot(page, "passkey-signed-in")
    token = {c["name"]: c["value"] for c in await context.cookies()}["hearth_session"]
    assert await user_status(stack, token) == 200

    # it is a full session: a password change with sign-out (sessions.revoked) ends it
    status, body, _ = await edge_json(stack, "POST", "/api/v2/users/signin",
                                      data={"login": user["username"], "password": user["password"]})
    assert status == 201
    status, _, _ = await edge_json(stack, "PUT", "/api/v2/user/password", data={
        "currentPassword": user["password"], "password": "a new very good passphrase", "signOutDevices": "true"},
        headers={"X-Plex-Token": body["authToken"]})
    assert status == 204
    assert await eventually(lambda: _status_is(stack, token, 401), timeout=10)
    await page.goto(stack.edge_url + "/account")
    await page.wait_for_url("**/signin**")

    # sign in again with the passkey, then remove it: it no longer signs in
    await page.click("#passkey-signin-button")
    await page.wait_for_url("**/account")
    await page.click("tr.passkey button")
    await page.wait_for_selector("text=The passkey was removed")
    assert await page.locator("tr.passkey").count() == 0
    await shot(page, "passkey-removed")
    await sign_out(stack, page)
    await page.click("#passkey-signin-button")
    error = page.locator("#passkey-signin-error")
    await error.wait_for(state="visible")
    assert "not known" in await error.inner_text()
    assert page.url.endswith("/signin")
    await shot(page, "passkey-removed-refused")
    await context.close()


async def _status_is(stack: Stack, token: str, status: int) -> bool:
    return await user_status(stack, token) == status


async def test_passkey_challenges_are_single_use(stack: Stack, browser: Browser) -> None:  # noqa: F811
    """A signed assertion replayed (same challenge) is refused; so is a made-up credential."""
    context, page = await new_page(browser)
    await add_virtual_authenticator(page)
    await sign_up_in_browser(stack, page)
    await page.fill("#passkey-name", "Replay test")
    await page.click("#passkey-add-button")
    await page.wait_for_selector("tr.passkey")
    await sign_out(stack, page)
    captured: list[str] = []

    async def keep(route) -> None:  # type: ignore[no-untyped-def]
        captured.append(route.request.post_data or "")
        await route.continue_()

    await page.route("**/signin/passkey", keep)
    await page.click("#passkey-signin-button")
    await page.wait_for_url("**/account")
    assert captured
    cookies = {c["name"]: c["value"] for c in await context.cookies()}
    async with aiohttp.ClientSession(cookies={"hearth_csrf": cookies["hearth_csrf"]}) as h:
        async with h.post(stack.edge_url + "/signin/passkey", data=captured[0],
                          headers={"Content-Type": "application/x-www-form-urlencoded"}) as r:
            assert r.status == 401, await r.text()
        async with h.post(stack.edge_url + "/signin/passkey", data={
                "csrf_token": dict(x.split("=", 1) for x in captured[0].split("&"))["csrf_token"],
                "credential": '{"id":"AAAA","rawId":"AAAA","type":"public-key","response":{}}'}) as r:
            assert r.status in (400, 401)
    # an expired challenge: the authenticator signs it, the server refuses it
    await sign_out(stack, page)
    await page.unroute("**/signin/passkey")

    async def expire_first(route) -> None:  # type: ignore[no-untyped-def]
        conn = await auth_db(stack)
        try:
            await conn.execute("UPDATE webauthn_challenges SET expires_at = now() - interval '1 second'"
                               " WHERE purpose = 'authenticate'")
        finally:
            await conn.close()
        await route.continue_()

    await page.route("**/signin/passkey", expire_first)
    await page.click("#passkey-signin-button")
    error = page.locator("#passkey-signin-error")
    await error.wait_for(state="visible")
    assert page.url.endswith("/signin")
    await context.close()
