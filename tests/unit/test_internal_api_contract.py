"""docs/INTERNAL-API.md and the routes agree: every internal route a service registers is
documented under its service's heading, and every documented internal route exists."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT
from tests.unit.test_apps import FACTORIES

pytestmark = pytest.mark.unit

HEADING = re.compile(r"^### .*?: (.*)$")
ROUTE = re.compile(r"`(GET|POST|PUT|DELETE|PATCH) (/internal/[^`?]*)")


def documented() -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    service = ""
    for line in (ROOT / "docs" / "INTERNAL-API.md").read_text().splitlines():
        if line.startswith("## "):
            service = line[3:].strip()
        m = HEADING.match(line)
        if m:
            for method, path in ROUTE.findall(m.group(1)):
                out.setdefault(service, set()).add((method, path))
    return out


def registered(service: str) -> set[tuple[str, str]]:
    app = FACTORIES[service]()
    routes = set()
    for resource in app.router.resources():
        path = resource.canonical
        if not path.startswith("/internal/"):
            continue
        for route in resource:
            if route.method not in ("HEAD", "OPTIONS"):
                routes.add((route.method, path))
    return routes


@pytest.mark.parametrize("service", sorted(FACTORIES))
def test_internal_routes_are_the_documented_ones(service: str) -> None:
    assert registered(service) == documented().get(service, set())
