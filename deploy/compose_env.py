"""Writes the env file of deploy/compose.yaml: generated secrets and the ports of every piece.

    python -m deploy.compose_env deploy/compose.env              # free ports (nothing collides)
    python -m deploy.compose_env deploy/compose.env --fixed      # make run's ports (8080, 8101...)

An existing file keeps its secrets (so a second `up` can still read the first one's data) and gets
any missing ones added; the file is mode 0600 and is never committed (.gitignore).
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from deploy.launcher import SERVICES, free_port, load_or_create_secrets

FIXED = {"EDGE_PORT": 8080, "PG_PORT": 55432, "KAFKA_PORT": 59092, "KAFKA_CONTROLLER_PORT": 59093, "SMTP_PORT": 1025,
         "HOLDER_LIVING_ROOM_PORT": 8201, "HOLDER_BASEMENT_PORT": 8202,
         **{f"{name.upper()}_PORT": port for name, port in SERVICES.items()}}


def write(path: Path, *, fixed: bool = False) -> dict[str, str]:
    values = load_or_create_secrets(path)  # the services' secrets, generated once
    extra = {k: str(v if fixed else free_port()) for k, v in FIXED.items() if k not in values}
    if "POSTGRES_PASSWORD" not in values:
        extra["POSTGRES_PASSWORD"] = secrets.token_urlsafe(24)
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
