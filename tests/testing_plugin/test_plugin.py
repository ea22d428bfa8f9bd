"""hearth.testing: the plugin is registered, stays idle in a suite that does not use it, and the
example holder app's own tests (examples/holder-app, using the plugin) pass against this run's stack."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from deploy.launcher import Stack
from hearth_testing.client import HearthStack
from tests.conftest import ROOT

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]


def test_plugin_is_registered_and_starts_nothing_unasked(pytestconfig: pytest.Config,
                                                        request: pytest.FixtureRequest) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("hearth")
    assert plugin is not None and plugin.__name__ == "hearth_testing.plugin"
    # Only fixtures, no hooks and nothing autouse: it acts only when a test asks for one of them.
    assert [n for n in dir(plugin) if n.startswith("pytest_")] == []
    assert not {"hearth_stack", "hearth_account", "hearth_holder_credentials", "hearth_sign_out"} & set(
        request.fixturenames)


def _url_env(stack: Stack) -> dict[str, str]:
    return {**os.environ, "HEARTH_URL": stack.edge_url, "HEARTH_ENV_FILE": str(stack.run_dir / "hearth.env"),
            "HEARTH_TESTING_MODE": "url", "PYTHONPATH": str(ROOT)}


async def test_example_holder_app_tests_pass_with_the_plugin(stack: Stack) -> None:
    res = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT / "examples" / "holder-app", env=_url_env(stack), capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout


async def test_sign_out_helper_times_a_sample_holder(stack: Stack) -> None:
    from hearth_testing.plugin import _from_url

    hs: HearthStack = _from_url(stack.edge_url, stack.run_dir / "hearth.env")
    account = await asyncio.to_thread(hs.sign_up)
    tv = await asyncio.to_thread(hs.sign_in, account.username, account.password, "tv")
    latency = await hs.change_password_and_wait_async(account, "alpha", timeout=20)  # a sample holder of the suite
    assert 0 <= latency < 5
    assert hs.user_status(tv) == 401 and hs.user_status(account.token) == 200
