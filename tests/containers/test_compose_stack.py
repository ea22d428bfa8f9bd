"""The compose stack (deploy/compose.yaml, every container from Hearth's own images, host network),
booted, checked through its edge with real clients, and torn down. Runs with HEARTH_COMPOSE=1 (CI's
containers stage); needs a Docker engine, the images (make images) and docker-compose.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import secrets
from collections.abc import Iterator

import aiohttp
import pytest
from plexapi.myplex import MyPlexAccount, MyPlexPinLogin

from hearth_testing.compose import ComposeStack
from tests.conftest import eventually
from tests.plexclient import plex_session

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(os.environ.get("HEARTH_COMPOSE") != "1", reason="HEARTH_COMPOSE=1 boots compose")]


@pytest.fixture(scope="module")
def compose() -> Iterator[ComposeStack]:
    with ComposeStack(project=f"hearth-ci-{secrets.token_hex(3)}") as c:
        yield c


async def library_status(port: str, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": token}) as r:
            return r.status


async def test_compose_stack_sign_up_plexapi_pin_link_sign_out_and_reset_email(compose: ComposeStack) -> None:
    stack = compose.stack
    assert stack is not None
    edge = stack.edge_url
    # sign-up through the edge
    account = await asyncio.to_thread(stack.sign_up)
    # sign-in with python-plexapi
    plex = await asyncio.to_thread(MyPlexAccount, account.username, account.password, session=plex_session(edge))
    assert plex.username == account.username and plex.authenticationToken
    # a PIN link: a TV shows a code, the signed-in account links it, the TV collects its token
    headers = {"X-Plex-Client-Identifier": f"tv-{secrets.token_hex(4)}", "X-Plex-Product": "Plex for Roku",
               "X-Plex-Device-Name": "Living room"}
    login = MyPlexPinLogin(session=plex_session(edge), headers=headers)
    code = await asyncio.to_thread(lambda: login.pin)
    login.run(timeout=60)
    await asyncio.to_thread(plex.link, code)
    assert await asyncio.to_thread(login.waitForLogin)
    tv_token = login.token
    assert tv_token and stack.user_status(tv_token) == 200
    # the sample-holder containers accept the TV's session, then refuse it after a password change
    # with sign-out (made from the plexapi session, which stays signed in)
    holders = {"living-room": compose.values["HOLDER_LIVING_ROOM_PORT"], "basement": compose.values["HOLDER_BASEMENT_PORT"]}
    for port in holders.values():
        assert await library_status(port, tv_token) == 200
    account.token = plex.authenticationToken
    latency = await stack.change_password_and_wait_async(account, "living-room", timeout=30)
    for port in holders.values():
        await eventually(lambda p=port: library_status_is(p, tv_token, 401), timeout=10)
    assert stack.user_status(tv_token) == 401 and stack.user_status(plex.authenticationToken) == 200
    print(f"compose: sign-out applied by holder living-room {latency * 1000:.0f} ms after the request")
    # the reset email lands in the SMTP sink container
    async with aiohttp.ClientSession() as http:
        async with http.post(edge + "/api/v2/users/password/reset", data={"email": account.email},
                             headers={"Accept": "application/json"}) as r:
            assert r.status == 204

    link = re.compile(re.escape(edge) + r"/reset\S*")

    def reset_link() -> str | None:
        for raw in compose.mail():
            msg = email.message_from_string(raw)
            if account.email not in (msg["To"] or ""):
                continue
            for part in msg.walk():
                if part.get_content_type() == "text/plain":
                    found = link.search(part.get_payload(decode=True).decode())
                    if found:
                        return found.group(0)
        return None

    url = await eventually(reset_link, timeout=60, interval=0.5)
    assert len(url) > len(edge) + 20  # carries the reset token


async def library_status_is(port: str, token: str, status: int) -> bool:
    return await library_status(port, token) == status
