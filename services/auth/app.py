"""create_app(settings): auth's resources and routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from services.auth import routes, store, two_factor
from services.auth.minting import MintBatcher, auto_window
from services.auth.service import Auth, Topics, common_passwords
from services.auth.settings import Settings
from shared import cors, db, throttle
from shared.app import POOL, SettingsOf, base_app, periodic_ctx, pool_ctx, producer_ctx, relay_ctx
from shared.crypto import parse_keys
from shared.events import AUTH_EVENTS
from shared.holder import holder_ctx_factory
from shared.internal import InternalClient
from shared.passwords import HashParams, Passwords

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


_settings = SettingsOf(Settings)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    s = _settings(app)
    peppers = parse_keys(s.password_peppers.get_secret_value()) if s.password_peppers.get_secret_value() else {}
    passwords = Passwords(HashParams(s.argon2_memory_kib, s.argon2_time_cost, s.argon2_parallelism),
                          peppers=peppers, concurrency=s.argon2_concurrency, nice=s.argon2_nice)
    # Sign-in's throttle counters commit asynchronously (they do not wait for the WAL flush): a
    # database crash can lose the last fraction of a second of them, which at worst gives back a
    # place or forgets a failure counted in that instant; accounts, passwords, two-step state and
    # every token stay on the main pool.
    counters = await db.create_pool(s.db_url(), min_size=1, max_size=max(2, s.db_pool_max // 2),
                                    server_settings={"synchronous_commit": "off"})
    app[routes.AUTH] = Auth(s, app[POOL], passwords, Topics(auth_events=s.topic(AUTH_EVENTS)), counters=counters)
    app[routes.DEVICESESSION] = InternalClient(s.devicesession_url, s.internal_api_secret.get_secret_value())
    window = (auto_window(lambda: passwords.hash_seconds, passwords.concurrency) if s.mint_batch_window_ms is None
              else s.mint_batch_window_ms / 1000)
    app[routes.MINTER] = MintBatcher(app[routes.DEVICESESSION], window=window, busy=lambda: passwords.in_flight)
    passwords.on_settled.append(app[routes.MINTER].settled)
    app[routes.BACKGROUND] = set()
    # Load the common-password list (about 40 ms) now rather than in the first sign-up or change.
    common_passwords()
    yield
    pending: set[asyncio.Task[None]] = app[routes.BACKGROUND]
    if pending:
        await asyncio.wait(pending, timeout=10)
    await app[routes.MINTER].close()
    await app[routes.DEVICESESSION].close()
    passwords.close()
    await counters.close()


async def housekeeping(app: web.Application) -> None:
    """Purge long-expired reset tokens and stale throttle rows."""
    await store.purge_expired(app[POOL])
    await two_factor.purge_expired(app[POOL])
    await app[POOL].execute("DELETE FROM webauthn_challenges WHERE expires_at < now()")
    await throttle.purge(app[POOL])


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    cors.install(app)  # browser apps call the Plex API from their own origin
    app.cleanup_ctx.extend([
        pool_ctx([("auth", MIGRATIONS)]),
        producer_ctx,
        relay_ctx,
        auth_ctx,
        holder_ctx_factory("auth"),  # type: ignore[list-item]
        periodic_ctx("auth-housekeeping", lambda app: 300.0, housekeeping),
    ])
    routes.setup_routes(app)
    return app
