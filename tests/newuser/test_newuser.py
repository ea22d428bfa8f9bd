"""What a new user trips over (issue 15), tried the way a new user meets it.

- A clean start logs no ERROR line.
- The README's ``hearth holder --name NAME --port PORT`` attaches to the running stack as written.
- Every kind of sign-out is refused on the very next request, by every Hearth service that had the
  token cached: auth (``/api/v2/user``, ``/api/v2/ping``), linkcode (``/api/claim/token.json``)
  and web (the browser cookie).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from deploy.launcher import Stack, free_port
from tests.auth.test_auth import PASSWORD, sign_in, sign_up
from tests.conftest import ROOT, START_LOGS, eventually

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

TRIALS = 5


def error_lines(name: str, text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                level = str(orjson.loads(line).get("level", ""))
            except orjson.JSONDecodeError:
                level = ""
            if level in ("ERROR", "CRITICAL"):
                bad.append(f"{name}: {line[:300]}")
        elif re.search(r"\b(ERROR|FATAL|PANIC|SEVERE)\b", line):
            bad.append(f"{name}: {line[:300]}")
    return bad


async def test_clean_start_logs_no_error(stack: Stack) -> None:
    assert {"auth.log", "devicesession.log", "linkcode.log", "notification.log", "web.log", "kafka.log"} <= set(
        START_LOGS), sorted(START_LOGS)
    bad = [b for name, raw in START_LOGS.items() for b in error_lines(name, raw.decode(errors="replace"))]
    assert not bad, "\n".join(bad)


def hearth_command() -> list[str]:
    script = Path(sys.executable).parent / "hearth"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


async def library(port: int, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/library",
                                                         headers={"X-Plex-Token": token}) as r:
        return r.status


async def test_readme_hearth_holder_line_attaches_to_the_running_stack(stack: Stack) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "hearth holder --name NAME --port PORT" in readme
    port = free_port()
    # Only what a person's shell has: no Hearth settings at all. The stack's env file is found by
    # HEARTH_ENV_FILE here because this test stack lives in .run/test-<id>/, not in .run/.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HOLDER_", "KAFKA_", "TOPIC_", "DEVICESESSION_", "DATABASE_", "DB_"))}
    env["HEARTH_ENV_FILE"] = str(stack.run_dir / "hearth.env")
    proc = subprocess.Popen([*hearth_command(), "holder", "--name", "readme", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async def ready() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout=60, interval=0.2)
        a = await sign_up(stack)
        status, body, _ = await sign_in(stack, a["username"])
        assert status == 201
        token = body["authToken"]
        assert await library(port, token) == 200
        assert await library(port, "not-a-token") == 401
        async with aiohttp.ClientSession() as http, http.delete(stack.edge_url + "/api/v2/users/signout",
                                                                headers={"X-Plex-Token": token}) as r:
            assert r.status == 204
        await eventually(lambda: _refused(port, token), timeout=5)
    finally:
        proc.terminate()
        proc.wait(15)


async def _refused(port: int, token: str) -> bool:
    return await library(port, token) == 401


async def status_of(http: aiohttp.ClientSession, stack: Stack, method: str, path: str, token: str) -> int:
    async with http.request(method, stack.edge_url + path, headers={"X-Plex-Token": token,
                                                                    "X-Plex-Client-Identifier": "probe",
                                                                    "Accept": "application/json"}) as r:
        await r.read()
        return r.status


WARM = [("GET", "/api/v2/user"), ("GET", "/api/v2/ping"), ("GET", "/api/claim/token.json")]


async def warm(http: aiohttp.ClientSession, stack: Stack, token: str) -> None:
    """Each of these routes caches the token in its service's holder kit (auth, linkcode)."""
    for method, path in WARM:
        assert await status_of(http, stack, method, path, token) == 200, path


async def refused_at_once(http: aiohttp.ClientSession, stack: Stack, token: str) -> list[str]:
    got = [(path, await status_of(http, stack, method, path, token)) for method, path in WARM]
    return [f"{path} answered {s}" for path, s in got if s != 401]


async def test_sign_out_is_refused_on_the_next_request(stack: Stack) -> None:
    a = await sign_up(stack)
    async with aiohttp.ClientSession() as http:
        for _ in range(TRIALS):
            _, body, _ = await sign_in(stack, a["username"])
            token = body["authToken"]
            await warm(http, stack, token)
            assert await status_of(http, stack, "DELETE", "/api/v2/users/signout", token) == 204
            assert await refused_at_once(http, stack, token) == []


async def test_removed_device_is_refused_on_the_next_request(stack: Stack) -> None:
    a = await sign_up(stack)
    _, me, _ = await sign_in(stack, a["username"], client="phone")
    async with aiohttp.ClientSession() as http:
        for i in range(TRIALS):
            _, tv, _ = await sign_in(stack, a["username"], client=f"tv-{i}")
            await warm(http, stack, tv["authToken"])
            async with http.get(stack.edge_url + "/devices.json",
                                headers={"X-Plex-Token": me["authToken"], "Accept": "application/json"}) as r:
                devices = (await r.json())["MediaContainer"]["Device"]
            device = next(d for d in devices if d["clientIdentifier"] == f"tv-{i}")
            assert await status_of(http, stack, "DELETE", f"/devices/{device['id']}.xml", me["authToken"]) == 204
            assert await refused_at_once(http, stack, tv["authToken"]) == []


def csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


async def test_sign_out_all_other_devices_and_browser_sign_out_are_refused_on_the_next_request(
        stack: Stack) -> None:
    a = await sign_up(stack)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser, aiohttp.ClientSession() as http:
        async with browser.get(stack.edge_url + "/signin") as r:
            token_field = csrf(await r.text())
        async with browser.post(stack.edge_url + "/signin", data={
                "csrf_token": token_field, "login": a["username"], "password": PASSWORD, "next": "/account"}) as r:
            assert r.status == 200 and "/account" in str(r.url)
            page = await r.text()
        for _ in range(TRIALS):
            _, other, _ = await sign_in(stack, a["username"], client="other-app")
            await warm(http, stack, other["authToken"])
            async with browser.post(stack.edge_url + "/account/signout-others",
                                    data={"csrf_token": csrf(page)}) as r:
                assert r.status == 200
                page = await r.text()
                assert "other session" in page and "signed out" in page
            assert await refused_at_once(http, stack, other["authToken"]) == []
        # The browser's own session: signed out, then the very next page is the sign-in page.
        async with browser.post(stack.edge_url + "/signout", data={"csrf_token": csrf(page)},
                                allow_redirects=False) as r:
            assert r.status == 303
        async with browser.get(stack.edge_url + "/account", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].startswith("/signin")


async def test_password_change_with_sign_out_is_refused_on_the_next_request(stack: Stack) -> None:
    a = await sign_up(stack)
    password = PASSWORD
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            _, keep, _ = await sign_in(stack, a["username"], password, client="keeper")
            _, other, _ = await sign_in(stack, a["username"], password, client="other")
            await warm(http, stack, other["authToken"])
            new = f"{PASSWORD} number {i}"
            async with http.put(stack.edge_url + "/api/v2/user/password",
                                headers={"X-Plex-Token": keep["authToken"], "X-Plex-Client-Identifier": "keeper"},
                                data={"currentPassword": password, "password": new, "signOutDevices": "1"}) as r:
                assert r.status == 204, await r.text()
            password = new
            assert await refused_at_once(http, stack, other["authToken"]) == []
            assert await status_of(http, stack, "GET", "/api/v2/user", keep["authToken"]) == 200
