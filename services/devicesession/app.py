"""create_app(settings): devicesession's resources, consumers and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from services.devicesession import events, routes, store
from services.devicesession.service import Topics
from services.devicesession.settings import Settings
from shared import cors, db
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
from shared.events import (
    AUTH_EVENTS,
    DEVICESESSION_EVENTS,
    REVOCATIONS_APPLIED,
    SESSIONS_REVOKED,
)

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


_settings = SettingsOf(Settings)


async def topics_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    app[routes.TOPICS] = Topics(sessions_revoked=s.topic(SESSIONS_REVOKED), events=s.topic(DEVICESESSION_EVENTS))
    app[routes.TOUCHES] = {}
    app[routes.HOLDERS_SEEN] = set()
    app[routes.INSTANCES_RECORDED] = {}
    yield


async def flush_touches(app: web.Application) -> None:
    """Write the batched last-used times (introspection never writes inline)."""
    pending, app[routes.TOUCHES] = app[routes.TOUCHES], {}
    if pending:
        await store.touch_sessions(app[POOL], pending)


async def mint_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """A small pool for sign-in's session mint with asynchronous commit: the answer does not wait for
    the WAL flush. A database crash can lose the last fraction of a second of minted sessions (their
    clients sign in again); it cannot bring back a revoked one: revocations use the main pool."""
    s = _settings(app)
    pool = await db.create_pool(s.db_url(), min_size=1, max_size=max(2, s.db_pool_max // 2),
                                server_settings={"synchronous_commit": "off"})
    app[routes.MINT_POOL] = pool
    yield
    await pool.close()


async def purge_instances(app: web.Application) -> None:
    """Holder instances not heard of for 30 days are forgotten (pods get new names on every start);
    their acknowledgements stay."""
    await app[POOL].execute("DELETE FROM holder_instances WHERE last_seen_at < now() - interval '30 days'")


def auth_consumer(app: web.Application) -> ConsumerRunner:
    s = app[SETTINGS]
    # The same handlers and consumer name serve POST /internal/revocations/by-event (auth hands over
    # a password change ahead of its copy on Kafka): whichever comes second does nothing.
    app[routes.REVOKER] = routes.Revoker(s.group("devicesession.revoker"), events.make_auth_handler(app[routes.TOPICS]))
    return ConsumerRunner(
        bootstrap=s.kafka_bootstrap_servers, group=app[routes.REVOKER].consumer, topics=[s.topic(AUTH_EVENTS)],
        handler=app[routes.REVOKER].handlers, producer=app[PRODUCER], pool=app[POOL],
    )


def ack_consumer(app: web.Application) -> ConsumerRunner:
    s = app[SETTINGS]
    return ConsumerRunner(
        bootstrap=s.kafka_bootstrap_servers, group=s.group("devicesession.acks"),
        topics=[s.topic(REVOCATIONS_APPLIED)], handler=events.make_ack_handler(app[POOL]), producer=app[PRODUCER],
        pool=app[POOL],
    )


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    cors.install(app)  # browser apps call the Plex API from their own origin
    app.cleanup_ctx.extend([
        pool_ctx([("devicesession", MIGRATIONS)]),
        mint_pool_ctx,
        producer_ctx,
        relay_ctx,
        topics_ctx,
        periodic_ctx("touch-flusher", lambda app: _settings(app).touch_interval, flush_touches, at_exit=True),
        periodic_ctx("holder-instances-purge", lambda app: 3600.0, purge_instances),
        consumer_ctx(auth_consumer),
        consumer_ctx(ack_consumer),
    ])
    routes.setup_routes(app)
    return app
