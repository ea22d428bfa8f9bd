"""create_app(settings): linkcode's resources and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from services.linkcode import routes, store
from services.linkcode.service import LinkCodes
from services.linkcode.settings import Settings
from shared import throttle
from shared.app import POOL, SETTINGS, base_app, pool_ctx, producer_ctx, relay_ctx
from shared.events import LINKCODE_EVENTS, SessionsRevoked
from shared.holder import HOLDER, holder_ctx_factory
from shared.internal import InternalClient

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


def _settings(app: web.Application) -> Settings:
    s = app[SETTINGS]
    assert isinstance(s, Settings)
    return s


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


async def cleanup_ctx(app: web.Application) -> AsyncIterator[None]:
    """Expired PINs, device codes and claim tokens are deleted periodically: nothing grows unbounded."""
    interval = _settings(app).cleanup_interval

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await store.purge_expired(app[POOL])
                await throttle.purge(app[POOL])
            except Exception:
                log.exception("cleanup failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.cleanup_ctx.extend([
        pool_ctx([("linkcode", MIGRATIONS)]),
        producer_ctx,
        relay_ctx,
        linkcodes_ctx,
        holder_ctx_factory("linkcode", revocation_callback),  # type: ignore[list-item]
        kit_ready_ctx,
        cleanup_ctx,
    ])
    routes.setup_routes(app)
    return app
