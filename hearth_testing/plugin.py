"""pytest plugin ``hearth.testing`` (entry point ``pytest11``): a real Hearth for your tests.

Fixtures (each starts something only when a test asks for it):

- ``hearth_stack`` (session): a running Hearth as a :class:`~hearth_testing.client.HearthStack`:
  at ``HEARTH_URL`` when set (with ``HEARTH_ENV_FILE``, a ``KEY=VALUE`` file such as the launcher's
  ``.run/hearth.env``, for the secrets and addresses holders need); else the whole stack on containers
  (``deploy/compose.yaml``) when a Docker engine, Hearth's images and a compose tool are there; else
  the local launcher on free ports. ``HEARTH_TESTING_MODE=url|compose|launcher`` forces one.
- ``hearth_account``: a fresh account, signed in (``.token``).
- ``hearth_holder_credentials``: credentials for a fresh holder id, ready for ``HolderKit(**c.kit_kwargs())``.
- ``hearth_sign_out``: ``hearth_sign_out(account, holder_id) -> seconds``: a password change with
  "sign out connected devices", waiting until that holder acknowledged it
  (``await hearth_sign_out.wait_async(...)`` from async tests).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hearth_testing.client import Account, HearthStack, HolderCredentials


def _env_file(path: str | Path | None) -> dict[str, str]:
    if not path:
        return {}
    values: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            values[k.strip()] = v.strip()
    return values


def _from_url(url: str, env_file: str | Path | None = None) -> HearthStack:
    # As the hearth commands read it: the environment first, then the env file for what it lacks.
    env = {**_env_file(env_file or os.environ.get("HEARTH_ENV_FILE")), **os.environ}
    return HearthStack(
        edge_url=url.rstrip("/"),
        devicesession_url=env.get("DEVICESESSION_URL", "http://127.0.0.1:8102"),
        kafka_bootstrap=env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        topic_prefix=env.get("TOPIC_PREFIX", ""),
        internal_api_secret=env.get("INTERNAL_API_SECRET", ""),
        holder_master_secret=env.get("HOLDER_SECRET", ""),
        mode="url",
    )


def _mode() -> str:
    forced = os.environ.get("HEARTH_TESTING_MODE")
    if forced:
        return forced
    if os.environ.get("HEARTH_URL"):
        return "url"
    from hearth_testing import compose, containers

    hearth_image = os.environ.get("HEARTH_IMAGE", "hearth/hearth:latest")
    if shutil.which("docker") and compose.compose_command() and containers.engine_available(hearth_image):
        return "compose"
    return "launcher"


@pytest.fixture(scope="session")
def hearth_stack() -> Iterator[HearthStack]:
    mode = _mode()
    if mode == "url":
        yield _from_url(os.environ["HEARTH_URL"])
    elif mode == "compose":
        from hearth_testing.compose import ComposeStack

        with ComposeStack() as c:
            assert c.stack is not None
            yield c.stack
    elif mode == "launcher":
        from deploy.launcher import Stack, remove_run_dir

        run_dir = Path(tempfile.mkdtemp(prefix="hearth-testing-"))
        prefix = f"ht{secrets.token_hex(3)}"
        stack = Stack(run_dir, console=False, fixed_ports=False, holders=(), topic_prefix=f"{prefix}.",
                      extra_env={"DB_NAME_PREFIX": f"{prefix}_"})
        try:
            stack.start()
            yield HearthStack(edge_url=stack.edge_url, devicesession_url=stack.url("devicesession"),
                              kafka_bootstrap=stack.kafka_bootstrap, topic_prefix=stack.topic_prefix,
                              internal_api_secret=stack.env["INTERNAL_API_SECRET"],
                              holder_master_secret=stack.env["HOLDER_SECRET"], mode="launcher")
        finally:
            stack.stop()
            remove_run_dir(run_dir)
    else:
        raise pytest.UsageError(f"HEARTH_TESTING_MODE must be url, compose or launcher, not {mode!r}")


@pytest.fixture
def hearth_account(hearth_stack: HearthStack) -> Account:
    return hearth_stack.sign_up()


@pytest.fixture
def hearth_holder_credentials(hearth_stack: HearthStack) -> HolderCredentials:
    return hearth_stack.holder_credentials()


class SignOut:
    """Callable fixture value: a password change with sign-out, timed to one holder's acknowledgement."""

    def __init__(self, stack: HearthStack) -> None:
        self.stack = stack

    def __call__(self, account: Account, holder_id: str, **kw: Any) -> float:
        return self.stack.change_password_and_wait(account, holder_id, **kw)

    async def wait_async(self, account: Account, holder_id: str, **kw: Any) -> float:
        return await self.stack.change_password_and_wait_async(account, holder_id, **kw)


@pytest.fixture
def hearth_sign_out(hearth_stack: HearthStack) -> SignOut:
    return SignOut(hearth_stack)
