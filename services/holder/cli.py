"""``hearth holder``: run a sample holder."""

from __future__ import annotations

import logging

import click
from aiohttp import web

from shared import logs


@click.command("holder")
@click.option("--name", required=True, help="holder id (its introspection user name and its acknowledgements' name)")
@click.option("--instance", default=None, help="instance id in acknowledgements (default: INSTANCE_ID, POD_NAME, "
              "else <hostname>-<pid>)")
@click.option("--port", type=int, default=8201, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def command(name: str, instance: str | None, port: int, host: str) -> None:
    """Run a sample media server that holds Hearth sessions (GET /library)."""
    from services.holder.app import HolderSettings, create_app

    settings = HolderSettings(name=name, http_port=port, http_host=host)
    if instance:
        settings = settings.model_copy(update={"instance_id": instance})
    logs.setup(f"holder-{name}", settings.log_level)
    from shared.app import new_event_loop

    web.run_app(create_app(settings), host=host, port=port, access_log=None, loop=new_event_loop(),
                print=lambda *_: logging.getLogger(__name__).info("listening", extra={"port": port}))
