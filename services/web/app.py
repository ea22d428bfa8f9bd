"""create_app(settings): the web service's resources, middlewares and routes."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from services.web.settings import Settings
from shared.app import base_app, pool_ctx, producer_ctx, relay_ctx

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.cleanup_ctx.extend([pool_ctx([("web", MIGRATIONS)]), producer_ctx, relay_ctx])
    return app
