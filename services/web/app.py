"""create_app(settings): the account web pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from services.web import routes
from services.web.settings import Settings
from shared.app import HTML_ERRORS, SETTINGS, base_app, producer_ctx
from shared.holder import holder_ctx_factory
from shared.internal import InternalClient


async def clients_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    secret = s.internal_api_secret.get_secret_value()
    app[routes.AUTH] = InternalClient(s.auth_url, secret)
    app[routes.DEVICESESSION] = InternalClient(s.devicesession_url, secret)
    app[routes.LINKCODE] = InternalClient(s.linkcode_url, secret)
    yield
    for key in (routes.AUTH, routes.DEVICESESSION, routes.LINKCODE):
        await app[key].close()


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.middlewares.append(routes.cookies_middleware)
    app.on_response_prepare.append(routes.security_headers)
    app[HTML_ERRORS] = routes.html_error
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=jinja2.select_autoescape(["html"], default=True))
    app.cleanup_ctx.extend([producer_ctx, clients_ctx, holder_ctx_factory("web")])  # type: ignore[list-item]
    routes.setup_routes(app)
    return app
