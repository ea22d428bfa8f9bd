"""The edge inside a container: render ``deploy/nginx/hearth.conf.template`` from the environment
and run nginx in the foreground (``python -m deploy.edge``; used by deploy/compose.yaml).

Environment: ``EDGE_PORT`` (8080), ``EDGE_LISTEN`` (127.0.0.1), ``EDGE_PREFIX`` (/tmp/edge), and for
each of auth, devicesession, linkcode, notification and web:

- ``<SERVICE>_URL`` (``http://host:port``): where the service is reached;
- ``<SERVICE>_REPLICAS`` (optional, comma-separated URLs): its replicas. Then the edge's upstream
  lists them all, and the edge also runs the service's internal balancer on ``<SERVICE>_URL``'s
  address, so the other services, which call ``<SERVICE>_URL``, fail over between replicas too.
  These are the same upstreams and balancers as ``make run TOPOLOGY=cluster``
  (``deploy.launcher.nginx_includes``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from deploy.launcher import DEPLOY, SERVICES, nginx_includes, render


def _address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url.strip())
    return parts.hostname or "127.0.0.1", parts.port or default_port


def config(env: dict[str, str]) -> str:
    """The nginx configuration, with the files it includes written under ``EDGE_PREFIX``."""
    prefix = Path(env.get("EDGE_PREFIX", "/tmp/edge"))  # noqa: S108 - the container's own /tmp
    prefix.mkdir(parents=True, exist_ok=True)
    upstreams: dict[str, str | int] = {}
    replicas: dict[str, list[str]] = {}
    balancers: dict[str, str] = {}
    for name, port in SERVICES.items():
        url = env.get(f"{name.upper()}_URL", f"http://127.0.0.1:{port}")
        listed = [u for u in env.get(f"{name.upper()}_REPLICAS", "").split(",") if u.strip()]
        addresses = [_address(u, port) for u in listed] or [_address(url, port)]
        replicas[name] = [f"{host}:{p}" for host, p in addresses]
        if listed:
            host, p = _address(url, port)
            balancers[name] = f"{host}:{p}"
        upstreams[f"{name}_host"], upstreams[f"{name}_port"] = addresses[0]
    for old in [*prefix.glob("upstream-*.conf"), *prefix.glob("internal-lb*.conf")]:
        old.unlink()
    for file, text in nginx_includes(replicas, balancers).items():
        (prefix / file).write_text(text)
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
