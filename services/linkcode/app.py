"""create_app(settings): linkcode's resources and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from services.linkcode import events, routes, store
from services.linkcode.service import LinkCodes
from services.linkcode.settings import Settings
from shared import cors, throttle
from shared.app import (
    POOL,
    PRODUCER,
    SETTINGS,
    SettingsOf,
    base_app,
    consumer_ctx,
    periodic_ctx,
    pool_ctx,
    producer_ctx,
    relay_ctx,
)
from shared.consumer import ConsumerRunner
from shared.events import LINKCODE_EVENTS, SESSIONS_REVOKED
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


def revocation_consumer(app: web.Application) -> ConsumerRunner:
    s = app[SETTINGS]
    return ConsumerRunner(
        bootstrap=s.kafka_bootstrap_servers, group=s.group("linkcode.revocations"),
        topics=[s.topic(SESSIONS_REVOKED)], handler=events.revocation_handlers(app[routes.LINKCODES]),
        producer=app[PRODUCER], pool=app[POOL],
    )


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
        consumer_ctx(revocation_consumer),
        holder_ctx_factory("linkcode"),  # type: ignore[list-item]
        kit_ready_ctx,
        periodic_ctx("linkcode-cleanup", lambda app: _settings(app).cleanup_interval, cleanup),
    ])
    routes.setup_routes(app)
    return app
