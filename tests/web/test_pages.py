"""The account pages in a real browser (Playwright driving Debian's Chromium) against the real stack.

Screenshots of every page are saved under artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from plexapi.myplex import MyPlexPinLogin

from deploy.launcher import Stack
from tests.auth.test_auth import user_status
from tests.conftest import ROOT, eventually
from tests.notification.test_notification import body_text, mails
from tests.plexclient import plex_session

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def new_page(browser: Browser) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(viewport={"width": 1000, "height": 800})
    return context, await context.new_page()


async def sign_up_in_browser(stack: Stack, page: Page, password: str = "a very good passphrase") -> dict[str, str]:
    name = f"w{uuid.uuid4().hex[:10]}"
    await page.goto(stack.edge_url + "/signup")
    await page.fill("#email", f"{name}@example.org")
    await page.fill("#username", name)
    await page.fill("#password", password)
    await page.click("button[type=submit]")
    await page.wait_for_url("**/account")
    return {"username": name, "email": f"{name}@example.org", "password": password}


async def sign_in_in_browser(stack: Stack, page: Page, login: str, password: str) -> None:
    await page.goto(stack.edge_url + "/signin")
    await page.fill("#login", login)
    await page.fill("#password", password)
    await page.click("button[type=submit]")
    await page.wait_for_url("**/account")


async def test_sign_up_sign_in_link_a_device_and_see_it(stack: Stack, browser: Browser) -> None:
    context, page = await new_page(browser)
    await page.goto(stack.edge_url + "/signup")
    await shot(page, "signup")
    user = await sign_up_in_browser(stack, page)
    assert user["username"] in await page.inner_text("h1")
    await shot(page, "account")
    # sign in again in a fresh browser
    other, page2 = await new_page(browser)
    await page2.goto(stack.edge_url + "/signin")
    await page2.fill("#login", user["username"])
    await page2.fill("#password", "wrong password here")
    await page2.click("button[type=submit]")
    assert "wrong" in (await page2.inner_text("[role=alert]")).lower()
    await shot(page2, "signin-error")
    await sign_in_in_browser(stack, page2, user["email"], user["password"])
    # a TV shows a code; the page links it
    cid = f"tv-{uuid.uuid4().hex[:8]}"
    login = MyPlexPinLogin(session=plex_session(stack.edge_url),
                           headers={"X-Plex-Client-Identifier": cid, "X-Plex-Product": "Plex for Samsung",
                                    "X-Plex-Device-Name": "Bedroom TV", "X-Plex-Platform": "Tizen"})
    code = await asyncio.to_thread(lambda: login.pin)
    login.run(timeout=60)
    await page.goto(stack.edge_url + f"/link?code={code.lower()}")
    await shot(page, "link")
    await page.click("button[type=submit]")
    assert "Bedroom TV" in await page.inner_text("main")
    await shot(page, "link-confirm")
    await page.click("button[value=approve]")
    await page.wait_for_selector("text=is now linked")
    assert await asyncio.to_thread(login.waitForLogin)
    assert await user_status(stack, login.token) == 200
    await page.goto(stack.edge_url + "/account")
    assert "Bedroom TV" in await page.inner_text("table")
    await shot(page, "account-devices")
    await context.close()
    await other.close()


async def test_wrong_code_and_csrf_less_posts_are_refused(stack: Stack, browser: Browser) -> None:
    context, page = await new_page(browser)
    await sign_up_in_browser(stack, page)
    await page.goto(stack.edge_url + "/link")
    await page.fill("#code", "QQQQ")
    await page.click("button[type=submit]")
    assert "wrong or has expired" in await page.inner_text("#code-error")
    await shot(page, "link-wrong-code")
    cookies = {c["name"]: c["value"] for c in await context.cookies()}
    async with aiohttp.ClientSession(cookies=cookies) as http:
        for path in ("/signin", "/account/password", "/link", "/account/signout-others", "/forgot"):
            async with http.post(stack.edge_url + path, data={"login": "x", "password": "y", "code": "ABCD"}) as r:
                assert r.status == 403, path
                assert "did not come from this site" in await r.text()
        async with http.post(stack.edge_url + "/signin", data={"csrf_token": "forged", "login": "x"}) as r:
            assert r.status == 403
    await context.close()


async def test_forgot_email_reset_with_sign_out_signs_everything_out(stack: Stack, browser: Browser) -> None:
    context, page = await new_page(browser)
    user = await sign_up_in_browser(stack, page)
    second, page2 = await new_page(browser)
    await sign_in_in_browser(stack, page2, user["username"], user["password"])
    # a device signed in through the Plex API
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + "/api/v2/users/signin",
                             data={"login": user["username"], "password": user["password"]},
                             headers={"X-Plex-Client-Identifier": "roku-1", "Accept": "application/json"}) as r:
            device_token = (await r.json())["authToken"]
    await page.goto(stack.edge_url + "/forgot")
    await shot(page, "forgot")
    await page.fill("#email", user["email"])
    await page.click("button[type=submit]")
    assert "If an account exists" in await page.inner_text("main")
    await shot(page, "forgot-sent")
    msg = (await eventually(lambda: mails(stack.mail_dir, user["email"]), timeout=10))[0]
    link = re.search(r"(http://\S+/reset\?token=\S+)", body_text(msg))
    assert link
    await page.goto(link.group(1))
    await page.fill("#password", "brand new passphrase")
    await page.fill("#confirm", "different passphrase")
    await page.click("button[type=submit]")
    assert "do not match" in await page.inner_text("#confirm-error")
    await shot(page, "reset-mismatch")
    await page.fill("#password", "brand new passphrase")
    await page.fill("#confirm", "brand new passphrase")
    assert await page.is_checked("input[name=signOutDevices]")
    await shot(page, "reset")
    await page.click("button[type=submit]")
    text = await page.inner_text("main")
    assert "Your password was changed" in text and "signed out" in text
    await shot(page, "reset-done")
    assert await user_status(stack, device_token) == 401
    await page2.goto(stack.edge_url + "/account")
    await page2.wait_for_url("**/signin?next=/account")
    # the link works once
    await page.goto(link.group(1))
    await page.fill("#password", "another passphrase here")
    await page.fill("#confirm", "another passphrase here")
    await page.click("button[type=submit]")
    assert "invalid, expired or already used" in await page.inner_text("[role=alert]")
    await context.close()
    await second.close()


async def test_change_password_and_remove_a_device_from_the_account_page(stack: Stack, browser: Browser) -> None:
    context, page = await new_page(browser)
    user = await sign_up_in_browser(stack, page)
    tokens = []
    async with aiohttp.ClientSession() as http:
        for cid in ("phone-1", "tv-1"):
            async with http.post(stack.edge_url + "/api/v2/users/signin",
                                 data={"login": user["username"], "password": user["password"]},
                                 headers={"X-Plex-Client-Identifier": cid, "X-Plex-Device-Name": cid,
                                          "Accept": "application/json"}) as r:
                tokens.append((await r.json())["authToken"])
    await page.goto(stack.edge_url + "/account")
    row = page.locator("tr", has_text="tv-1")
    await row.locator("button").click()
    assert "removed and signed out" in await page.inner_text("[role=status]")
    await eventually(lambda: user_status_is(stack, tokens[1], 401), timeout=2)
    assert await user_status(stack, tokens[0]) == 200
    await page.fill("#currentPassword", user["password"])
    await page.fill("#password", "short")
    await page.fill("#confirm", "short")
    await page.click("form[action='/account/password'] button")
    assert "at least 8" in await page.inner_text("#password-error")
    await shot(page, "account-weak-password")
    await page.fill("#currentPassword", user["password"])
    await page.fill("#password", "the next passphrase")
    await page.fill("#confirm", "the next passphrase")
    await page.click("form[action='/account/password'] button")
    notice = await page.inner_text("[role=status]")
    assert "1 device was signed out" in notice, notice
    await shot(page, "account-password-changed")
    assert await user_status(stack, tokens[0]) == 401
    await page.goto(stack.edge_url + "/account")  # this browser stays signed in
    assert user["username"] in await page.inner_text("h1")
    await context.close()


async def user_status_is(stack: Stack, token: str, status: int) -> bool:
    return await user_status(stack, token) == status


async def test_claim_page_token_is_exchanged_by_a_server(stack: Stack, browser: Browser) -> None:
    context, page = await new_page(browser)
    await sign_up_in_browser(stack, page)
    await page.goto(stack.edge_url + "/claim")
    claim = (await page.inner_text("#claim-token")).strip()
    assert claim.startswith("claim-")
    assert f'PLEX_CLAIM="{claim}"' in await page.inner_text("#docker-line")
    await page.wait_for_function("document.getElementById('countdown').textContent.includes('left')")
    await shot(page, "claim")
    result = await asyncio.to_thread(subprocess.run, [
        "curl", "-s", "-X", "POST", "-H", "X-Plex-Client-Identifier: pms-web-test", "-H", "X-Plex-Provides: server",
        "-H", "X-Plex-Product: Plex Media Server", f"{stack.edge_url}/api/claim/exchange?token={claim}"],
        capture_output=True, text=True)
    assert "<authentication-token>" in result.stdout
    await page.goto(stack.edge_url + "/account")
    assert "pms-web-test" in await page.inner_text("table") or "Plex Media Server" in await page.inner_text("table")
    await page.goto(stack.edge_url + "/signout")
    await shot(page, "signout")
    await page.click("button[type=submit]")
    await page.wait_for_url("**/signin")
    await page.goto(stack.edge_url + "/account")
    await page.wait_for_url("**/signin?next=/account")
    await context.close()


def test_screenshots_folder_is_named_in_the_readme() -> None:
    assert "artifacts/screenshots/" in (ROOT / "README.md").read_text()
    assert isinstance(SHOTS, Path)


async def test_sign_up_errors_are_shown_next_to_their_field(stack: Stack, browser: Browser) -> None:
    context, page = await new_page(browser)
    first = await sign_up_in_browser(stack, page)
    await context.clear_cookies()
    await page.goto(stack.edge_url + "/signup")
    await page.fill("#email", first["email"].upper())
    await page.fill("#username", f"w{uuid.uuid4().hex[:10]}")
    await page.fill("#password", "another very good passphrase")
    await page.click("button[type=submit]")
    email_error = page.locator("#email-error")
    await email_error.wait_for()
    assert "already in use" in (await email_error.inner_text())
    assert await page.locator("#email").get_attribute("aria-invalid") == "true"
    assert await page.locator(".notice.bad").count() == 0  # not at the top of the form
    await shot(page, "signup-email-taken")
    await page.fill("#email", f"new{uuid.uuid4().hex[:8]}@example.org")
    await page.fill("#username", first["username"])
    await page.fill("#password", "another very good passphrase")
    await page.click("button[type=submit]")
    await page.locator("#username-error").wait_for()
    assert "already taken" in (await page.locator("#username-error").inner_text())
    await context.close()
