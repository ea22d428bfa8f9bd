"""The holder app against a real Hearth, with the hearth.testing fixtures."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from holder_app import create_app  # noqa: E402


@pytest.fixture
async def app_url(hearth_holder_credentials) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    runner = web.AppRunner(create_app(**hearth_holder_credentials.kit_kwargs()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(600):  # the kit is ready once it has its partitions
            async with http.get(url + "/readyz") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.1)
    yield url
    await runner.cleanup()


async def library(url: str, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/library", headers={"X-Plex-Token": token}) as r:
            return r.status


async def test_signed_in_account_sees_the_library_and_a_bad_token_does_not(app_url, hearth_account) -> None:
    assert await library(app_url, hearth_account.token) == 200
    assert await library(app_url, "not-a-token") == 401


async def test_sign_out_after_password_change_reaches_the_app_fast(app_url, hearth_stack, hearth_account,
                                                                    hearth_holder_credentials, hearth_sign_out):
    tv = hearth_stack.sign_in(hearth_account.username, hearth_account.password, client="living-room-tv")
    assert await library(app_url, tv) == 200  # now cached by the app
    latency = await hearth_sign_out.wait_async(hearth_account, hearth_holder_credentials.holder_id)
    assert latency < 2.0
    assert await library(app_url, tv) == 401  # the app applied it: no stale cache
    assert await library(app_url, hearth_account.token) == 200  # the session that changed it stays
