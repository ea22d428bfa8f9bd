"""The internal HTTP client against a real aiohttp server: JSON both ways, errors re-raised with
their status, code and retry-after, connections reused, a closed server connection not reused,
hostile header values refused before anything is sent, an unreachable service -> Unavailable."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from deploy.launcher import free_port
from shared.errors import HearthError, Unavailable
from shared.internal import InternalClient


@pytest.fixture
async def server():
    seen: list[web.Request] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"got": await request.json(), "auth": request.headers.get("Authorization"),
                                  "rid": request.headers.get("X-Request-Id")}, status=201)

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"detail": "taken", "code": "conflict"}, status=409, headers={"Retry-After": "3"})

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def closing(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"Connection": "close"})

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/refuse", refuse)
    app.router.add_delete("/empty", empty)
    app.router.add_get("/closing", closing)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_json_errors_and_connection_reuse(server) -> None:
    url, seen = server
    client = InternalClient(url, "s3cret")
    try:
        data, headers = await client.request("POST", "/echo", {"name": "é", "n": [1, 2]})
        assert data == {"got": {"name": "é", "n": [1, 2]}, "auth": "Bearer s3cret", "rid": None}
        assert headers["content-type"].startswith("application/json")
        assert await client.call("DELETE", "/empty") is None
        with pytest.raises(HearthError) as err:
            await client.call("GET", "/refuse")
        assert (err.value.status, err.value.code, err.value.retry_after) == (409, "conflict", 3)
        # Three exchanges, one connection.
        assert len(client._idle) == 1
        assert len({r.transport for r in seen}) == 1
        # The server closes this one: it is not kept.
        assert await client.call("GET", "/closing") == {"ok": True}
        await asyncio.sleep(0.05)
        assert all(c.closed for c in client._idle) or not client._idle
        data = await client.call("POST", "/echo", {"again": True})
        assert data["got"] == {"again": True}
        # Concurrent calls open more connections and all come back to the pool.
        answers = await asyncio.gather(*(client.call("POST", "/echo", {"i": i}) for i in range(5)))
        assert [a["got"]["i"] for a in answers] == list(range(5))
    finally:
        await client.close()


async def test_hostile_headers_and_paths_are_refused_before_sending(server) -> None:
    url, seen = server
    client = InternalClient(url, "s3cret")
    try:
        with pytest.raises(ValueError):
            await client.call("POST", "/echo", {}, headers={"X-Plex-Token": "abc\r\nX-Injected: 1"})
        with pytest.raises(ValueError):
            await client.call("POST", "/echo HTTP/1.1\r\nX: y", {})
        assert seen == []
    finally:
        await client.close()


async def test_unreachable_service_is_unavailable() -> None:
    client = InternalClient(f"http://127.0.0.1:{free_port()}", "s3cret", timeout=2)
    with pytest.raises(Unavailable):
        await client.call("GET", "/anything")




def test_pooled_connections_do_not_cross_event_loops() -> None:
    """A command may call from one asyncio.run and then from another: the connection pooled by the
    first loop is left behind, not written to (its answer would never be read)."""
    import threading

    port = free_port()
    ready = threading.Event()
    server_loop = asyncio.new_event_loop()
    runners: list[web.AppRunner] = []

    async def serve() -> None:
        async def echo(request: web.Request) -> web.Response:
            return web.json_response(await request.json())

        app = web.Application()
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ready.set()

    thread = threading.Thread(target=lambda: (server_loop.run_until_complete(serve()), server_loop.run_forever()),
                              daemon=True)
    thread.start()
    assert ready.wait(10)
    client = InternalClient(f"http://127.0.0.1:{port}", "s3cret", timeout=3)
    try:
        assert asyncio.run(client.call("POST", "/echo", {"round": 1})) == {"round": 1}
        assert len(client._idle) == 1
        assert asyncio.run(client.call("POST", "/echo", {"round": 2})) == {"round": 2}
    finally:
        asyncio.run_coroutine_threadsafe(runners[0].cleanup(), server_loop).result(10)
        server_loop.call_soon_threadsafe(server_loop.stop)
        thread.join(5)
