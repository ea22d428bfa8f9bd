"""python -m services.web: read settings once and serve."""

from __future__ import annotations

from services.web.app import create_app
from services.web.settings import Settings
from shared.app import run
from shared.settings import load


def main() -> None:
    settings = load(Settings)
    run(create_app(settings), settings)


if __name__ == "__main__":
    main()
