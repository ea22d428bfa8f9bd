"""Every service has the house layout (STYLE.md): the same file names, or its module docstring says
why it has no use for one (a paragraph starting "Layout:" naming it)."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

SERVICES = ["auth", "devicesession", "linkcode", "notification", "web"]
FILES = ["__init__.py", "__main__.py", "app.py", "routes.py", "service.py", "store.py", "events.py", "errors.py",
         "migrations"]


@pytest.mark.parametrize("service", SERVICES)
def test_service_has_the_house_files_or_says_why_not(service: str) -> None:
    folder = ROOT / "services" / service
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    layout = " ".join(p for p in doc.split("\n\n") if p.startswith("Layout:"))
    missing = [name for name in FILES if not (folder / name).exists()]
    unexplained = [name for name in missing if f"``{name}" not in layout]
    assert unexplained == [], f"{service} lacks {unexplained} and its docstring does not say why"
    assert doc.strip(), f"{service} has no module docstring"
