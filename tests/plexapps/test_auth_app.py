"""The auth app ("Sign in with Plex" popups) in a real browser against the real stack.

An Overseerr-style app page served from another origin (a small aiohttp server on a free port)
creates a strong PIN with fetch() (CORS), opens the popup on ``/auth#?...``, the person signs in and
approves, the popup is forwarded to the app's ``forwardUrl``, and the page polls the PIN and reads
``/users/account.json``. python-plexapi's ``MyPlexPinLogin(oauth=True)`` and Home Assistant's
``plexauth`` run unchanged, pointed at Hearth. Refusals never redirect. Screenshots of every auth
page are saved under artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

from deploy.launcher import Stack, free_port
from shared.settings import with_database
from tests.auth.test_auth import PASSWORD, sign_up, user_status
from tests.conftest import edge_json
from tests.plexclient import plex_session
from tests.web.test_pages import browser, new_page, shot  # noqa: F401  (the module's browser fixture)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

APP_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Overseerr-style app</title></head>
<body><h1>Media requests</h1><button id="login">Sign in with Plex</button><pre id="out"></pre>
<script>
const EDGE = new URLSearchParams(location.search).get("edge");
const CID = "overseerr-" + Math.random().toString(16).slice(2, 10);
const headers = {"Accept": "application/json", "X-Plex-Product": "Overseerr", "X-Plex-Version": "Plex OAuth",
  "X-Plex-Client-Identifier": CID, "X-Plex-Model": "Plex OAuth", "X-Plex-Platform": "Chrome",
  "X-Plex-Platform-Version": "130.0", "X-Plex-Device": "Linux", "X-Plex-Device-Name": "Chrome (Overseerr)",
  "X-Plex-Device-Screen-Resolution": "1000x800", "X-Plex-Language": "en"};
const out = document.getElementById("out");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
document.getElementById("login").addEventListener("click", async () => {
  const popup = window.open("", "PlexAuth", "width=600,height=700");  // opened at once, as Overseerr does
  try {
    const created = await fetch(EDGE + "/api/v2/pins?strong=true", {method: "POST", headers});
    const pin = await created.json();
    out.textContent = "pin " + created.status;
    const params = new URLSearchParams({clientID: CID, code: pin.code, forwardUrl: location.origin + "/done",
      "context[device][product]": "Overseerr", "context[device][platform]": "Chrome",
      "context[device][device]": "Linux", "context[device][deviceName]": "Chrome (Overseerr)"});
    popup.location.href = EDGE + "/auth#?" + params.toString();
    let token = null;
    for (let i = 0; i < 120 && !token; i++) {
      await sleep(500);
      const polled = await fetch(EDGE + "/api/v2/pins/" + pin.id, {headers});
      const body = await polled.json();
      if (!(body.expiresIn > 0)) { out.textContent = "expired"; return; }
      token = body.authToken;
    }
    const account = await fetch(EDGE + "/users/account.json", {headers: {...headers, "X-Plex-Token": token}});
    const user = (await account.json()).user;
    out.textContent = JSON.stringify({status: account.status, email: user.email.toLowerCase(),
      username: user.username, token: user.authentication_token === token});
  } catch (err) { out.textContent = "failed: " + err; }
});
</script></body></html>"""


@dataclass
class AppServer:
    origin: str
    forwarded: list[str] = field(default_factory=list)


@pytest.fixture
async def app_server() -> AsyncIterator[AppServer]:
    """The app's own origin: its page and its forwardUrl (/done)."""
    port = free_port()
    server = AppServer(f"http://127.0.0.1:{port}")

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=APP_PAGE, content_type="text/html")

    async def done(request: web.Request) -> web.Response:
        server.forwarded.append(str(request.rel_url))
        return web.Response(text="<!doctype html><title>Signed in</title><h1 id=done>Back in the app</h1>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/done", done)
    app.router.add_get("/callback", done)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield server
    await runner.cleanup()


async def sign_in_on_popup(popup: Page, login: str, shot_name: str | None = None) -> None:
    await popup.wait_for_url(re.compile(r"/signin\?next=/auth"))
    if shot_name:
        await shot(popup, shot_name)
    await popup.fill("#login", login)
    await popup.fill("#password", PASSWORD)
    await popup.click("button[type=submit]")
    await popup.wait_for_url(re.compile(r"/auth\?clientID="))


async def test_overseerr_style_page_signs_in_through_the_popup(stack: Stack, browser: Browser,  # noqa: F811
                                                               app_server: AppServer) -> None:
    a = await sign_up(stack)
    context, page = await new_page(browser)
    await page.goto(app_server.origin + "/?" + urllib.parse.urlencode({"edge": stack.edge_url}))
    async with page.expect_popup() as opened:
        await page.click("#login")
    popup = await opened.value
    await sign_in_on_popup(popup, a["username"], "auth-signin")
    # the confirmation shows the PIN's own headers and where the popup goes next
    assert await popup.inner_text("#auth-product") == "Overseerr"
    assert await popup.inner_text("#auth-device") == "Chrome (Overseerr)"
    assert await popup.inner_text("#auth-platform") == "Chrome"
    assert await popup.inner_text("#auth-forward") == urllib.parse.urlsplit(app_server.origin).netloc
    await shot(popup, "auth-approve")
    await popup.click("#auth-approve")
    await popup.wait_for_url(app_server.origin + "/done")
    await shot(popup, "auth-forwarded")
    assert app_server.forwarded == ["/done"]
    await page.wait_for_function("document.getElementById('out').textContent.startsWith('{')", timeout=60_000)
    import json

    result = json.loads(await page.inner_text("#out"))
    assert result == {"status": 200, "email": a["email"], "username": a["username"], "token": True}
    await context.close()


async def test_python_plexapi_oauth_url_approved_in_the_browser(stack: Stack, browser: Browser,  # noqa: F811
                                                                app_server: AppServer) -> None:
    from plexapi.myplex import MyPlexPinLogin

    a = await sign_up(stack)
    headers = {"X-Plex-Product": "Kometa", "X-Plex-Device-Name": "kometa-box", "X-Plex-Platform": "Linux",
               "X-Plex-Client-Identifier": f"kometa-{uuid.uuid4().hex[:8]}"}
    login = MyPlexPinLogin(session=plex_session(stack.edge_url), headers=headers, oauth=True)
    forward = app_server.origin + "/callback?state=xyz%2F1&x=a+b"
    url = await asyncio.to_thread(login.oauthUrl, forward)
    assert url.startswith("https://app.plex.tv/auth/#!?")
    login.run(timeout=90)
    context, page = await new_page(browser)
    await page.goto(url.replace("https://app.plex.tv", stack.edge_url))
    await sign_in_on_popup(page, a["email"])
    assert await page.inner_text("#auth-product") == "Kometa"
    assert await page.inner_text("#auth-device") == "kometa-box"
    await page.click("#auth-approve")
    await page.wait_for_url(re.compile("^" + re.escape(app_server.origin + "/callback?")))
    assert app_server.forwarded == ["/callback?state=xyz%2F1&x=a+b"]  # forwardUrl sent unchanged
    assert await asyncio.to_thread(login.waitForLogin)
    assert login.token and await user_status(stack, login.token) == 200
    await context.close()


async def test_home_assistant_plexauth_flow(stack: Stack, browser: Browser,  # noqa: F811
                                            app_server: AppServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import plexauth

    monkeypatch.setattr(plexauth, "CODES_URL", stack.edge_url + "/api/v2/pins.json?strong=true")
    monkeypatch.setattr(plexauth, "AUTH_URL", stack.edge_url + "/auth#!?{}")
    monkeypatch.setattr(plexauth, "TOKEN_URL", stack.edge_url + "/api/v2/pins/{}")
    a = await sign_up(stack)
    payload = {"X-Plex-Product": "Home Assistant", "X-Plex-Version": "2026.11", "X-Plex-Device": "Home Assistant",
               "X-Plex-Platform": "Home Assistant", "X-Plex-Model": "Plex OAuth"}
    forward = app_server.origin + "/callback?flow_id=abc123"
    async with aiohttp.ClientSession() as session:
        auth = plexauth.PlexAuth(payload, session)
        await auth.initiate_auth()
        url = auth.auth_url(forward)
        context, page = await new_page(browser)
        await page.goto(url)
        await sign_in_on_popup(page, a["username"])
        assert await page.inner_text("#auth-product") == "Home Assistant"
        await page.click("#auth-approve")
        await page.wait_for_url(re.compile("^" + re.escape(app_server.origin + "/callback?")))
        assert app_server.forwarded == ["/callback?flow_id=abc123"]
        token = await auth.token(timeout=30)
    assert token and await user_status(stack, token) == 200
    status, body, _ = await edge_json(stack, "GET", "/users/account.json", headers={"X-Plex-Token": token})
    assert status == 200 and body["user"]["email"] == a["email"]
    await context.close()


async def strong_pin(stack: Stack, client: str, product: str = "Tautulli") -> dict[str, Any]:
    status, pin, _ = await edge_json(stack, "POST", "/api/v2/pins?strong=true", headers={
        "X-Plex-Client-Identifier": client, "X-Plex-Product": product, "X-Plex-Device-Name": "Tautulli server",
        "X-Plex-Platform": "Linux"})
    assert status == 201 and len(pin["code"]) == 25
    return pin


async def poll(stack: Stack, pin: dict[str, Any], client: str) -> Any:
    status, body, _ = await edge_json(stack, "GET", f"/api/v2/pins/{pin['id']}",
                                      headers={"X-Plex-Client-Identifier": client})
    assert status == 200
    return body["authToken"]


def auth_url(stack: Stack, form: str = "#?", **params: str) -> str:
    return stack.edge_url + "/auth" + form + urllib.parse.urlencode(params)


async def open_auth(page: Page, url: str) -> None:
    """As an app opens a new popup for each sign-in (a fragment change alone would not load a page)."""
    await page.goto("about:blank")
    await page.goto(url)


async def test_refusals_are_clear_and_never_redirect(stack: Stack, browser: Browser) -> None:  # noqa: F811
    a = await sign_up(stack)
    context, page = await new_page(browser)
    client = f"tautulli-{uuid.uuid4().hex[:8]}"
    # the bare page and an incomplete fragment
    await page.goto(stack.edge_url + "/auth")
    await page.wait_for_selector("#auth-incomplete:not([hidden])")
    await shot(page, "auth-incomplete")
    # signed out: the request survives the sign-in (the #!? form)
    pin = await strong_pin(stack, client)
    await open_auth(page, auth_url(stack, "#!?", clientID=client, code=pin["code"]))
    await sign_in_on_popup(page, a["username"])
    assert await page.inner_text("#auth-product") == "Tautulli"
    # deny: nothing linked, no redirect
    await page.click("#auth-deny")
    await page.wait_for_selector("#auth-denied")
    await shot(page, "auth-denied")
    assert "/auth" in page.url
    status, _, _ = await edge_json(stack, "GET", f"/api/v2/pins/{pin['id']}",
                                   headers={"X-Plex-Client-Identifier": client})
    assert status == 404  # the app's poller learns at once and stops waiting
    # approve without forwardUrl: the window can be closed (the auth/#!? form)
    pin = await strong_pin(stack, client)
    await open_auth(page, stack.edge_url + "/auth/#!?" + urllib.parse.urlencode({"clientID": client, "code": pin["code"]}))
    await page.click("#auth-approve")
    await page.wait_for_selector("#auth-done")
    await shot(page, "auth-done")
    assert "close this window" in await page.inner_text("#auth-done")
    assert await poll(stack, pin, client)
    # a non-http forwardUrl is refused before anything can be approved
    for bad in ("javascript:alert(document.domain)", "//evil.example/steal", "data:text/html,hi", "http:/evil",
                "https://evil.example\\@good"):
        fresh = await strong_pin(stack, client)
        await open_auth(page, auth_url(stack, clientID=client, code=fresh["code"], forwardUrl=bad))
        await page.wait_for_selector("#auth-problem")
        assert "only http and https" in await page.inner_text("#auth-problem"), bad
        assert await page.locator("#auth-approve").count() == 0 and page.url.startswith(stack.edge_url + "/auth")
        assert await poll(stack, fresh, client) is None
    await shot(page, "auth-bad-forward-url")
    # clientID of another app: refused, and the server checks again when the form is tampered with
    other = await strong_pin(stack, client)
    await open_auth(page, auth_url(stack, clientID="someone-else", code=other["code"],
                             forwardUrl="http://127.0.0.1:9/cb"))
    await page.wait_for_selector("#auth-problem")
    assert "different app" in await page.inner_text("#auth-problem")
    await shot(page, "auth-client-mismatch")
    await open_auth(page, auth_url(stack, clientID=client, code=other["code"], forwardUrl="http://127.0.0.1:9/cb"))
    await page.eval_on_selector("input[name=clientID]", "e => e.value = 'someone-else'")
    await page.click("#auth-approve")
    await page.wait_for_selector("#auth-problem")
    assert "different app" in await page.inner_text("#auth-problem") and "127.0.0.1:9" not in page.url
    assert await poll(stack, other, client) is None
    # unknown and expired codes
    await open_auth(page, auth_url(stack, clientID=client, code="A" * 25))
    await page.wait_for_selector("#auth-problem")
    assert "unknown or has expired" in await page.inner_text("#auth-problem")
    expired = await strong_pin(stack, client)
    conn = await asyncpg.connect(with_database(stack.database_url,
                                               f"{stack.extra_env['DB_NAME_PREFIX']}hearth_linkcode"))
    try:
        await conn.execute("UPDATE pins SET expires_at = now() - interval '1 second' WHERE id = $1", expired["id"])
    finally:
        await conn.close()
    await open_auth(page, auth_url(stack, clientID=client, code=expired["code"], forwardUrl="http://127.0.0.1:9/cb"))
    await page.wait_for_selector("#auth-problem")
    assert "unknown or has expired" in await page.inner_text("#auth-problem")
    await shot(page, "auth-expired")
    # a POST without the form's CSRF token is refused
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + "/auth", data={"clientID": client, "code": other["code"],
                                                             "decision": "approve"}, allow_redirects=False) as r:
            assert r.status == 403
    await context.close()


async def test_the_server_side_needs_no_javascript(stack: Stack) -> None:
    """Only reading the fragment needs a script: the query form works with a plain HTTP client."""
    client = f"ombi-{uuid.uuid4().hex[:8]}"
    pin = await strong_pin(stack, client, product="Ombi")
    query = urllib.parse.urlencode({"clientID": client, "code": pin["code"], "forwardUrl": "http://ombi.local/cb",
                                    "context[device][product]": "Ombi"})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.edge_url}/auth?{query}", allow_redirects=False) as r:
            assert r.status == 303
            target = r.headers["Location"]
        assert target.startswith("/signin?next=")
        nxt = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)["next"][0]
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(nxt).query) == urllib.parse.parse_qs(query)
        async with http.get(f"{stack.edge_url}/auth") as r:
            page = await r.text()
            assert r.status == 200 and "/static/auth.js" in page and "<noscript>" in page
            # never framed by another site (a click-jacked Approve), never cached, no Referer with the code
            assert r.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in r.headers[
                "Content-Security-Policy"]
            assert r.headers["Cache-Control"] == "no-store" and r.headers["Referrer-Policy"] == "no-referrer"
        async with http.get(f"{stack.edge_url}/static/auth.js") as r:
            assert r.status == 200 and "location.hash" in await r.text()


async def test_home_assistant_over_https_for_the_plex_host_names(stack: Stack, app_server: AppServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """plexauth and the browser reach plex.tv and app.plex.tv by name over HTTPS: the names resolve to
    the edge (as /etc/hosts would), the client trusts the launcher's CA, nothing else changes."""
    import base64
    import hashlib
    import socket
    import ssl

    import plexauth
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from playwright.async_api import async_playwright

    from tests.web.test_pages import CHROMIUM_ARGS

    port = stack.https_port
    assert port
    monkeypatch.setattr(plexauth, "CODES_URL", f"https://plex.tv:{port}/api/v2/pins.json?strong=true")
    monkeypatch.setattr(plexauth, "AUTH_URL", f"https://app.plex.tv:{port}/auth#!?{{}}")
    monkeypatch.setattr(plexauth, "TOKEN_URL", f"https://plex.tv:{port}/api/v2/pins/{{}}")

    class PlexNamesResolver(aiohttp.abc.AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
            assert host in ("plex.tv", "app.plex.tv", "clients.plex.tv")
            return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0,
                     "flags": socket.AI_NUMERICHOST}]

        async def close(self) -> None:
            return None

    # Chromium: the same names mapped to the edge; the edge's key accepted (a headless browser has no
    # writable trust store to import ca.pem into)
    leaf = x509.load_pem_x509_certificate((stack.run_dir / "tls" / "edge.pem").read_bytes())
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP plex.tv 127.0.0.1, MAP app.plex.tv 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={pin}"]
    a = await sign_up(stack)
    connector = aiohttp.TCPConnector(resolver=PlexNamesResolver(),
                                     ssl=ssl.create_default_context(cafile=str(stack.tls_ca)))
    async with aiohttp.ClientSession(connector=connector) as session, async_playwright() as p:
        chromium = await p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        try:
            auth = plexauth.PlexAuth({"X-Plex-Product": "Home Assistant", "X-Plex-Device": "Home Assistant",
                                      "X-Plex-Platform": "Home Assistant", "X-Plex-Model": "Plex OAuth"}, session)
            await auth.initiate_auth()
            url = auth.auth_url(app_server.origin + "/callback?flow_id=tls")
            assert url.startswith(f"https://app.plex.tv:{port}/auth#!?")
            context, page = await new_page(chromium)
            await page.goto(url)
            await sign_in_on_popup(page, a["username"])
            assert page.url.startswith(f"https://app.plex.tv:{port}/auth?")
            await shot(page, "auth-approve-https")
            await page.click("#auth-approve")
            await page.wait_for_url(re.compile("^" + re.escape(app_server.origin + "/callback?")))
            token = await auth.token(timeout=30)
            await context.close()
        finally:
            await chromium.close()
    assert token and await user_status(stack, token) == 200


async def test_a_new_person_signs_up_from_the_popup_and_the_request_survives(stack: Stack,
                                                                           browser: Browser) -> None:  # noqa: F811
    client = f"jellyseerr-{uuid.uuid4().hex[:8]}"
    pin = await strong_pin(stack, client, product="Jellyseerr")
    context, page = await new_page(browser)
    await open_auth(page, auth_url(stack, clientID=client, code=pin["code"], forwardUrl="http://127.0.0.1:9/cb"))
    await page.wait_for_url(re.compile(r"/signin\?next=/auth"))
    await page.click("#signup-link")
    await page.wait_for_url(re.compile(r"/signup\?next=/auth"))
    name = f"n{uuid.uuid4().hex[:10]}"
    await page.fill("#email", f"{name}@example.org")
    await page.fill("#username", name)
    await page.fill("#password", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"/auth\?clientID="))
    assert await page.inner_text("#auth-product") == "Jellyseerr"
    assert await page.inner_text("#auth-forward") == "127.0.0.1:9"
    await context.close()
