"""A bare aiohttp server: the reference for HTTP figures (``python -m bench.bare PORT``).

``GET /`` answers ``ok``; ``POST /introspect`` reads a form and answers a small JSON object, the
same shape of work an introspection endpoint does minus the database.
"""

from __future__ import annotations

import sys

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def introspect(request: web.Request) -> web.Response:
    form = await request.post()
    return web.json_response({"active": bool(form.get("token")), "sub": "bench"})


def main() -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/introspect", introspect)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    main()
