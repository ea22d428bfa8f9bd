"""create_app(settings): notification's consumer and sender."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from aiohttp import web

from services.notification import events, routes
from services.notification.delivery import Sender
from services.notification.settings import Settings
from shared.app import (
    POOL,
    PRODUCER,
    SETTINGS,
    SettingsOf,
    add_ready_check,
    base_app,
    consumer_ctx,
    pool_ctx,
    producer_ctx,
    relay_ctx,
)
from shared.consumer import ConsumerRunner
from shared.events import AUTH_EVENTS, DEVICESESSION_EVENTS, LINKCODE_EVENTS, NOTIFICATION_DEAD_LETTERS

MIGRATIONS = Path(__file__).parent / "migrations"
SENDER = web.AppKey("sender", Sender)


_settings = SettingsOf(Settings)


async def sender_ctx(app: web.Application) -> AsyncIterator[None]:
    s = _settings(app)
    sender = Sender(s, app[POOL], s.topic(NOTIFICATION_DEAD_LETTERS))
    listener: asyncpg.Connection = await asyncpg.connect(s.db_url())
    await listener.add_listener("deliveries", lambda *_: sender.wake.set())
    sender.start()
    app[SENDER] = sender

    async def sender_running() -> bool:
        return sender.healthy

    add_ready_check(app, "sender", sender_running)
    yield
    await sender.stop()
    with contextlib.suppress(Exception):
        await listener.close()


def event_consumer(app: web.Application) -> ConsumerRunner:
    s = app[SETTINGS]
    return ConsumerRunner(
        bootstrap=s.kafka_bootstrap_servers, group=s.group("notification"),
        topics=[s.topic(AUTH_EVENTS), s.topic(DEVICESESSION_EVENTS), s.topic(LINKCODE_EVENTS)],
        handler=events.HANDLERS, producer=app[PRODUCER], pool=app[POOL],
    )


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.cleanup_ctx.extend([
        pool_ctx([("notification", MIGRATIONS)]),
        producer_ctx,
        relay_ctx,
        sender_ctx,
        consumer_ctx(event_consumer),
    ])
    routes.setup_routes(app)
    return app
