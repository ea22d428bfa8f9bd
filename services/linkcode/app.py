"""create_app(settings): linkcode's resources and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from services.linkcode import routes, store
from services.linkcode.service import LinkCodes
from services.linkcode.settings import Settings
from shared import cors, throttle
from shared.app import POOL, SettingsOf, base_app, periodic_ctx, pool_ctx, producer_ctx, relay_ctx
from shared.events import LINKCODE_EVENTS, SessionsRevoked
from shared.holder import HOLDER, holder_ctx_factory
from shared.internal import InternalClient

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


_settings = SettingsOf(Settings)


async def linkcodes_ctx(app: web.Application) -> AsyncIterator[None]:
    s = _settings(app)
    secret = s.internal_api_secret.get_secret_value()
    devicesession = InternalClient(s.devicesession_url, secret)
    auth = InternalClient(s.auth_url, secret)
    app[routes.LINKCODES] = LinkCodes(s, app[POOL], devicesession, auth, s.topic(LINKCODE_EVENTS))
    yield
    await devicesession.close()
    await auth.close()


def revocation_callback(app: web.Application) -> Callable[[SessionsRevoked], Awaitable[None]]:
    return app[routes.LINKCODES].on_revocation


async def kit_ready_ctx(app: web.Application) -> AsyncIterator[None]:
    app[routes.LINKCODES].kit = app[HOLDER]
    yield


async def cleanup(app: web.Application) -> None:
    """Expired PINs, device codes and claim tokens are deleted: nothing grows without bound."""
    await store.purge_expired(app[POOL])
    await throttle.purge(app[POOL])


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    cors.install(app)  # browser apps call the Plex API from their own origin
    app.cleanup_ctx.extend([
        pool_ctx([("linkcode", MIGRATIONS)]),
        producer_ctx,
        relay_ctx,
        linkcodes_ctx,
        holder_ctx_factory("linkcode", revocation_callback),  # type: ignore[list-item]
        kit_ready_ctx,
        periodic_ctx("linkcode-cleanup", lambda app: _settings(app).cleanup_interval, cleanup),
    ])
    routes.setup_routes(app)
    return app
