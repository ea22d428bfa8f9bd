"""notification's HTTP routes (internal only: it has no public route on the edge)."""

from __future__ import annotations

from aiohttp import web

from services.notification import store
from services.notification.settings import Settings
from shared.app import POOL, SettingsOf
from shared.internal import require_internal

_settings = SettingsOf(Settings)


async def incident_deliveries(request: web.Request) -> web.Response:
    require_internal(request, _settings(request).internal_api_secret.get_secret_value())
    incident = request.match_info["incident_id"][:100]
    return web.json_response({"incident_id": incident, "deliveries": await store.incident_counts(
        request.app[POOL], incident)})



def setup_routes(app: web.Application) -> None:
    app.router.add_get("/internal/incidents/{incident_id}/deliveries", incident_deliveries)
