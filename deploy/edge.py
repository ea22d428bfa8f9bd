"""The edge inside a container: render ``deploy/nginx/hearth.conf.template`` from the environment
and run nginx in the foreground (``python -m deploy.edge``; used by deploy/compose.yaml).

Environment: ``EDGE_PORT`` (8080), ``EDGE_LISTEN`` (127.0.0.1), ``EDGE_PREFIX`` (/tmp/edge), and
``<SERVICE>_URL`` for auth, devicesession, linkcode and web (``http://host:port``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from deploy.launcher import DEPLOY, SERVICES, render


def config(env: dict[str, str]) -> str:
    prefix = Path(env.get("EDGE_PREFIX", "/tmp/edge"))  # noqa: S108 - the container's own /tmp
    prefix.mkdir(parents=True, exist_ok=True)
    upstreams: dict[str, str | int] = {}
    for name, port in SERVICES.items():
        url = urlsplit(env.get(f"{name.upper()}_URL", f"http://127.0.0.1:{port}"))
        upstreams[f"{name}_host"] = url.hostname or "127.0.0.1"
        upstreams[f"{name}_port"] = url.port or port
    return render(DEPLOY / "nginx" / "hearth.conf.template", prefix=prefix, edge_port=env.get("EDGE_PORT", "8080"),
                  edge_listen=env.get("EDGE_LISTEN", "127.0.0.1"), **upstreams)


def main() -> None:
    env = dict(os.environ)
    prefix = Path(env.get("EDGE_PREFIX", "/tmp/edge"))  # noqa: S108
    conf = prefix / "hearth.conf"
    text = config(env)
    conf.write_text(text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    sys.stdout.flush()
    os.execv(nginx, [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),  # noqa: S606
                     "-g", "daemon off;"])


if __name__ == "__main__":
    main()
