"""python -m services.devicesession: read settings once and serve."""

from __future__ import annotations

from services.devicesession.app import create_app
from services.devicesession.settings import Settings
from shared.app import run
from shared.settings import load


def main() -> None:
    settings = load(Settings)
    run(create_app(settings), settings)


if __name__ == "__main__":
    main()
