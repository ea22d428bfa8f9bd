"""notification's HTTP routes (internal only: it has no public route on the edge)."""

from __future__ import annotations

from aiohttp import web

from services.notification import store
from shared.app import POOL, internal_only


async def incident_deliveries(request: web.Request) -> web.Response:
    internal_only(request)
    incident = request.match_info["incident_id"][:100]
    return web.json_response({"incident_id": incident, "deliveries": await store.incident_counts(
        request.app[POOL], incident)})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/internal/incidents/{incident_id}/deliveries", incident_deliveries)
