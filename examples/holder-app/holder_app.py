"""A tiny media server that holds Hearth sessions: ``GET /library`` lists its films to any signed-in
Hearth account, and refuses a token as soon as Hearth signs that session out.

It embeds ``shared.holder.HolderKit``: tokens are validated through Hearth's introspection and
cached, and the kit's consumer of ``sessions.revoked`` evicts revoked sessions from the cache and
acknowledges each revocation.

    HOLDER_ID=my-server HOLDER_CREDENTIAL=... INTROSPECT_URL=http://127.0.0.1:8102/oauth/introspect \\
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python holder_app.py
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import web

from shared.holder import HolderKit

KIT = web.AppKey("kit", HolderKit)
FILMS = [{"title": "Night of the Living Bread", "year": 1990}, {"title": "The General", "year": 1926}]


async def library(request: web.Request) -> web.Response:
    token = request.headers.get("X-Plex-Token") or request.query.get("X-Plex-Token")
    principal = await request.app[KIT].validate(token)
    if principal is None:
        return web.json_response({"error": "sign in with Hearth"}, status=401)
    return web.json_response({"account": principal.account_id, "films": FILMS})


async def ready(request: web.Request) -> web.Response:
    healthy = request.app[KIT].healthy
    return web.json_response({"ready": healthy}, status=200 if healthy else 503)


def create_app(*, holder_id: str, holder_secret: str, introspect_url: str, bootstrap: str,
               topic_prefix: str = "") -> web.Application:
    app = web.Application()

    async def kit_ctx(app: web.Application) -> AsyncIterator[None]:
        kit = HolderKit(holder_id=holder_id, holder_secret=holder_secret, introspect_url=introspect_url,
                        bootstrap=bootstrap, topic_prefix=topic_prefix)
        await kit.start()
        app[KIT] = kit
        yield
        await kit.stop()

    app.cleanup_ctx.append(kit_ctx)
    app.router.add_get("/library", library)
    app.router.add_get("/readyz", ready)
    return app


if __name__ == "__main__":
    web.run_app(create_app(holder_id=os.environ["HOLDER_ID"], holder_secret=os.environ["HOLDER_CREDENTIAL"],
                           introspect_url=os.environ["INTROSPECT_URL"],
                           bootstrap=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                           topic_prefix=os.environ.get("TOPIC_PREFIX", "")),
                host="127.0.0.1", port=int(os.environ.get("PORT", "8300")))
