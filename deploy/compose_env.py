"""Writes the env file of deploy/compose.yaml: generated secrets, the Kafka cluster id and the ports
of every piece of the cluster topology.

    python -m deploy.compose_env deploy/compose.env              # free ports (nothing collides)
    python -m deploy.compose_env deploy/compose.env --fixed      # make run TOPOLOGY=cluster's ports

Port variables are named after the launcher's port keys: ``AUTH_PORT`` and ``AUTH_2_PORT`` for the
two replicas of auth, ``AUTH_LB_PORT`` for its internal balancer (served by the edge container),
``KAFKA_PORT``/``KAFKA_2_PORT``/``KAFKA_3_PORT`` and ``KAFKA_CONTROLLER_PORT``... for the brokers,
``HOLDER_BASEMENT_2_PORT`` for the second instance of the basement holder, ``PG_PORT``,
``SMTP_PORT``, ``EDGE_PORT``. ``ARGON2_CONCURRENCY`` splits this host's CPUs between the two auth
replicas (edit it when the replicas run on hosts of their own).

An existing file keeps its secrets (so a second `up` can still read the first one's data) and gets
any missing ones added; the file is mode 0600 and is never committed (.gitignore).
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from deploy.launcher import default_ports, free_port, load_or_create_secrets, new_kafka_cluster_id
from shared.passwords import cpu_share

# The topology of deploy/compose.yaml, the same as the launcher's cluster topology.
BROKERS = 3
REPLICAS = 2
HOLDERS = ("living-room", "basement")
HOLDER_INSTANCES = 2


def env_name(key: str) -> str:
    """The env file's variable for a launcher port key: ``auth#2`` -> ``AUTH_2_PORT``,
    ``lb:auth`` -> ``AUTH_LB_PORT``, ``holder:living-room#2`` -> ``HOLDER_LIVING_ROOM_2_PORT``."""
    if key == "postgres":
        return "PG_PORT"
    base, _, replica = key.partition("#")
    if base.startswith("lb:"):
        base = base.removeprefix("lb:") + "_lb"
    base = base.replace("holder:", "holder_").replace("-", "_").upper()
    return f"{base}_{replica}_PORT" if replica else f"{base}_PORT"


FIXED = {env_name(k): port for k, port in default_ports(brokers=BROKERS, replicas=REPLICAS, holders=HOLDERS,
                                                         holder_instances=HOLDER_INSTANCES).items()}


def write(path: Path, *, fixed: bool = False) -> dict[str, str]:
    values = load_or_create_secrets(path)  # the services' secrets, generated once
    extra = {k: str(v if fixed else free_port()) for k, v in FIXED.items() if k not in values}
    if "POSTGRES_PASSWORD" not in values:
        extra["POSTGRES_PASSWORD"] = secrets.token_urlsafe(24)
    if "KAFKA_CLUSTER_ID" not in values:  # every broker is formatted with it, once
        extra["KAFKA_CLUSTER_ID"] = new_kafka_cluster_id()
    if "ARGON2_CONCURRENCY" not in values:  # the auth replicas share this host's cores (as in the launcher)
        extra["ARGON2_CONCURRENCY"] = str(cpu_share(REPLICAS))
    if extra:
        values.update(extra)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.compose_env", description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--fixed", action="store_true", help="use make run's ports instead of free ones")
    args = parser.parse_args(argv)
    values = write(args.path, fixed=args.fixed)
    print(f"{args.path}: edge on http://127.0.0.1:{values['EDGE_PORT']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
