"""create_app(settings): the sample holder's app."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import plex
from shared.app import READY_CHECKS, SERVICE_NAME, healthz, metrics, readyz, request_context
from shared.errors import Unauthorized
from shared.holder import HOLDER, HolderKit, holder_secret

HOLDER_SETTINGS = web.AppKey("holder_settings", object)


class HolderSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    name: str
    http_host: str = "127.0.0.1"
    http_port: int = 8201
    log_level: str = "INFO"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    devicesession_url: str = "http://127.0.0.1:8102"
    holder_credential: SecretStr | None = None
    holder_secret: SecretStr | None = None
    cache_ttl: float = 30.0
    instance_id: str | None = None  # default: POD_NAME, else <hostname>-<pid> (see shared.holder)

    def credential(self) -> str:
        if self.holder_credential is not None:
            return self.holder_credential.get_secret_value()
        if self.holder_secret is not None:
            return holder_secret(self.holder_secret.get_secret_value(), self.name)
        raise SystemExit("set HOLDER_CREDENTIAL (or HOLDER_SECRET in development)")


async def library(request: web.Request) -> web.Response:
    token = await plex.param(request, "X-Plex-Token")
    principal = await request.app[HOLDER].validate(token)
    if principal is None:
        raise Unauthorized()
    return plex.respond(
        request,
        xml=plex.element("MediaContainer", {"size": 0, "title1": "Library", "accountID": principal.account_id}),
        json={"MediaContainer": {"size": 0, "title1": "Library", "accountID": principal.account_id}},
    )


HOLDER_NAME = web.AppKey("holder_name", str)


async def identity(request: web.Request) -> web.Response:
    """The server root a Plex client reads first (python-plexapi's ``PlexServer``, and so
    ``MyPlexResource.connect()``): who this server is, for a valid token only."""
    token = await plex.param(request, "X-Plex-Token")
    principal = await request.app[HOLDER].validate(token)
    if principal is None:
        raise Unauthorized()
    name = request.app[HOLDER_NAME]
    attrs = {"size": 0, "friendlyName": name, "machineIdentifier": f"holder-{name}", "version": "1.0.0",
             "platform": "Hearth", "myPlex": True, "myPlexSigninState": "ok"}
    return plex.respond(request, xml=plex.element("MediaContainer", attrs), json={"MediaContainer": attrs})


def create_app(settings: HolderSettings) -> web.Application:
    app = web.Application(middlewares=[request_context], client_max_size=64 * 1024)
    app[SERVICE_NAME] = f"holder-{settings.name}"
    app[HOLDER_NAME] = settings.name
    app[READY_CHECKS] = []

    async def kit_ctx(app: web.Application) -> AsyncIterator[None]:
        kit = HolderKit(
            holder_id=settings.name,
            introspect_url=settings.devicesession_url.rstrip("/") + "/oauth/introspect",
            holder_secret=settings.credential(),
            bootstrap=settings.kafka_bootstrap_servers,
            topic_prefix=settings.topic_prefix,
            cache_ttl=settings.cache_ttl,
            instance=settings.instance_id,
        )
        await kit.start()
        app[HOLDER] = kit

        async def assigned() -> bool:
            return kit.assigned.is_set()

        app[READY_CHECKS].append(("revocations", assigned))
        yield
        await kit.stop()

    app.cleanup_ctx.append(kit_ctx)
    app.router.add_get("/", identity)
    app.router.add_get("/library", library)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
