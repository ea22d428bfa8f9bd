"""PostgreSQL and Apache Kafka from Hearth's own images (``python -m deploy.images build``), started
by testcontainers-python on the host network.

The engine runs with no bridge, so each container shares the host's network and listens on
127.0.0.1 on a free port chosen here. Ryuk (testcontainers' reaper) is an image from a registry the
machine cannot reach, so it is disabled and the callers stop what they start; every container also
carries the label ``org.hearth.test-run=<id>``, and ``remove_labelled`` removes whatever a crashed
run left behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

POSTGRES_IMAGE = os.environ.get("HEARTH_POSTGRES_IMAGE", "hearth/postgres:15")
KAFKA_IMAGE = os.environ.get("HEARTH_KAFKA_IMAGE", "hearth/kafka:4.1.1")
RUN_LABEL = "org.hearth.test-run"


class ContainerStartError(RuntimeError):
    pass


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(container: Any, what: str, ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status in ("exited", "dead"):
            logs = wrapped.logs(tail=40).decode(errors="replace")
            raise ContainerStartError(f"{what} container exited:\n{logs}")
        if ready():
            return
        time.sleep(0.3)
    raise ContainerStartError(f"{what} was not ready within {timeout:.0f}s")


def _container(image: str, run_id: str, name: str) -> Any:
    from testcontainers.core.container import DockerContainer

    return (DockerContainer(image)
            .with_name(f"hearth-{run_id}-{name}")
            .with_kwargs(network_mode="host", labels={RUN_LABEL: run_id}))


def start_postgres(run_id: str, port: int, *, password: str | None = None, fast: bool = True,
                   timeout: float = 120) -> tuple[Any, str]:
    """A PostgreSQL server on 127.0.0.1:``port``; returns the container and its server URL."""
    c = (_container(POSTGRES_IMAGE, run_id, "postgres").with_env("PGPORT", str(port))
         .with_env("POSTGRES_FAST", "1" if fast else "0")
         .with_tmpfs_mount("/var/lib/hearth-tmp").with_env("PGDATA", "/var/lib/hearth-tmp/pg"))
    if password:
        c = c.with_env("POSTGRES_PASSWORD", password)
    c.start()
    try:
        def ready() -> bool:
            if not _port_open(port):
                return False
            res = c.get_wrapped_container().exec_run(
                ["pg_isready", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres"])
            return bool(res.exit_code == 0)

        _wait(c, "PostgreSQL", ready, timeout)
    except BaseException:
        c.stop()
        raise
    auth = f"postgres:{password}@" if password else "postgres@"
    return c, f"postgresql://{auth}127.0.0.1:{port}/postgres"


def start_kafka(run_id: str, port: int, controller_port: int, *, timeout: float = 150) -> tuple[Any, str]:
    """A single-node KRaft broker advertising 127.0.0.1:``port``; returns the container and bootstrap."""
    c = (_container(KAFKA_IMAGE, run_id, "kafka").with_env("KAFKA_PORT", str(port))
         .with_env("KAFKA_CONTROLLER_PORT", str(controller_port))
         .with_tmpfs_mount("/var/lib/hearth-tmp").with_env("KAFKA_DATA", "/var/lib/hearth-tmp/kafka"))
    c.start()
    try:
        def ready() -> bool:
            if not _port_open(port):
                return False
            logs = c.get_wrapped_container().logs(tail=200)
            return b"Kafka Server started" in logs

        _wait(c, "Kafka", ready, timeout)
    except BaseException:
        c.stop()
        raise
    return c, f"127.0.0.1:{port}"


def stop_all(containers: list[Any]) -> None:
    """Stop and remove containers, newest first; one failing does not keep the others running."""
    for c in reversed(containers):
        try:
            c.stop()
        except Exception as exc:  # noqa: BLE001 - report and go on with the rest
            print(f"hearth_testing: could not remove a container: {exc}", flush=True)
    containers.clear()


def remove_labelled(run_id: str | None = None) -> None:
    """Remove every container a Hearth test run labelled (``run_id``: only that run's)."""
    label = f"{RUN_LABEL}={run_id}" if run_id else RUN_LABEL
    res = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True)
    ids = res.stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", "-v", *ids], capture_output=True)


def engine_available(*images: str) -> bool:
    """Whether a Docker engine answers and has Hearth's infrastructure images (and ``images``)."""
    try:
        res = subprocess.run(["docker", "image", "inspect", POSTGRES_IMAGE, KAFKA_IMAGE, *images],
                             capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0
