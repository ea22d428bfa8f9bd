"""The sign-in mint batcher's default window: a few hashes' worth of the process's own hashing
throughput (pure logic; the batcher against devicesession is tests/auth/test_minting.py)."""

from __future__ import annotations

import pytest

from services.auth.minting import HASHES_PER_WINDOW, MAX_WINDOW, auto_window

pytestmark = pytest.mark.unit


def test_the_window_follows_the_hash_time_and_the_hashing_threads() -> None:
    seconds = 0.0
    one, two = auto_window(lambda: seconds, 1), auto_window(lambda: seconds, 2)
    assert one() == two() == 0.04  # nothing timed yet: the old fixed default
    seconds = 0.025
    assert one() == pytest.approx(HASHES_PER_WINDOW * 0.025)  # a replica with one hashing thread waits longer
    assert two() == pytest.approx(HASHES_PER_WINDOW * 0.025 / 2)
    seconds = 1.0  # very expensive hashes: still capped
    assert one() == MAX_WINDOW


def test_an_explicit_window_is_kept_as_configured() -> None:
    from services.auth.minting import MintBatcher
    from shared.internal import InternalClient

    client = InternalClient("http://127.0.0.1:9", "x")
    assert MintBatcher(client, window=0.0, busy=lambda: 0).window == 0.0
    assert MintBatcher(client, window=0.12, busy=lambda: 0).window == 0.12
    assert MintBatcher(client, window=auto_window(lambda: 0.03, 1), busy=lambda: 0).window == pytest.approx(0.09)
