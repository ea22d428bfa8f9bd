"""The whole Hearth on containers: ``deploy/compose.yaml`` (the cluster topology: three Kafka brokers,
two replicas of every service, two instances of each sample holder) booted with a fresh env file
(generated secrets, free ports, a unique project name), waited for, and torn down with its volumes.

Needs a Docker engine, Hearth's images (``python -m deploy.images build``) and Debian's
``docker-compose`` (or ``HEARTH_COMPOSE_CMD``, e.g. "docker compose").
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from hearth_testing.client import HearthStack

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "deploy" / "compose.yaml"
# Both replicas of every service and both instances of each sample holder (deploy/compose_env.py names).
READY_PORTS = tuple(f"{name}{replica}_PORT" for name in ("AUTH", "DEVICESESSION", "LINKCODE", "NOTIFICATION", "WEB",
                                                         "HOLDER_LIVING_ROOM", "HOLDER_BASEMENT")
                    for replica in ("", "_2"))


def compose_command() -> list[str] | None:
    configured = os.environ.get("HEARTH_COMPOSE_CMD")
    if configured:
        return shlex.split(configured)
    found = shutil.which("docker-compose")
    return [found] if found else None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own 127.0.0.1 URL
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class ComposeStack:
    """``with ComposeStack() as c: c.stack`` boots the stack; leaving the block removes everything."""

    def __init__(self, project: str | None = None, timeout: float = 300) -> None:
        cmd = compose_command()
        if cmd is None:
            raise RuntimeError("no compose tool: apt-get install docker-compose (or set HEARTH_COMPOSE_CMD)")
        self.project = project or f"hearth-test-{secrets.token_hex(4)}"
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix="hearth-compose-"))
        self.env_file = self.dir / "compose.env"
        self.base = [*cmd, "-p", self.project, "-f", str(COMPOSE_FILE), "--env-file", str(self.env_file)]
        self.values: dict[str, str] = {}
        self.stack: HearthStack | None = None

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "HEARTH_COMPOSE_ENV": str(self.env_file)})
        if check and res.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)} failed:\n{(res.stdout + res.stderr)[-3000:]}")
        return res

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def up(self) -> HearthStack:
        from deploy.compose_env import write

        self.values = write(self.env_file)
        self.run("up", "-d", timeout=self.timeout)
        deadline = time.monotonic() + self.timeout
        urls = [f"http://127.0.0.1:{self.values[p]}/readyz" for p in READY_PORTS]
        urls.append(f"http://127.0.0.1:{self.values['EDGE_PORT']}/healthz")
        while urls and time.monotonic() < deadline:
            urls = [u for u in urls if not _ready(u)]
            if urls:
                time.sleep(0.5)
        if urls:
            logs = self.run("logs", "--tail", "30", check=False).stdout[-4000:]
            raise RuntimeError(f"the compose stack was not ready within {self.timeout:.0f}s: {urls}\n{logs}")
        v = self.values
        self.stack = HearthStack(
            edge_url=f"http://127.0.0.1:{v['EDGE_PORT']}",
            devicesession_url=f"http://127.0.0.1:{v['DEVICESESSION_LB_PORT']}",  # the edge's balancer
            kafka_bootstrap=self.kafka_bootstrap,
            internal_api_secret=v["INTERNAL_API_SECRET"],
            holder_master_secret=v["HOLDER_SECRET"],
            mode="compose",
        )
        return self.stack

    @property
    def kafka_bootstrap(self) -> str:
        """All three brokers."""
        return ",".join(f"127.0.0.1:{self.values[k]}" for k in ("KAFKA_PORT", "KAFKA_2_PORT", "KAFKA_3_PORT"))

    def mail(self) -> list[str]:
        """The messages the SMTP sink container has saved (``.eml`` texts), oldest first."""
        cid = self.container("mail")
        res = subprocess.run(["docker", "exec", cid, "sh", "-c",
                              'for f in $(ls -tr /mail/*.eml 2>/dev/null); do cat "$f"; printf "\\n\\036\\n"; done'],
                             capture_output=True, text=True, timeout=60)
        return [m for m in res.stdout.split("\n\x1e\n") if m.strip()]

    def down(self) -> None:
        try:
            self.run("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ComposeStack:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
