"""The cluster topology for fault tests (marker ``faults``; ``.ci/run`` runs them with the suite).

One session-scoped cluster, started by the same launcher code as ``make run TOPOLOGY=cluster``, on
free ports and with its own PostgreSQL, so that killing brokers and restarting the database
cannot disturb the single-node stack the other tests use: three Kafka brokers (KRaft, RF 3,
min.insync.replicas=2), two replicas of every service behind nginx, two instances of each sample
holder. Deselect with ``-m "not faults"``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from deploy.launcher import Stack, remove_run_dir
from tests.conftest import ROOT, _keep_logs

FAULT_HOLDERS = ("alpha", "beta")


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Stack]:
    run_id = uuid.uuid4().hex[:8]
    run_dir = ROOT / ".run" / f"faults-{run_id}"
    saved = {k: os.environ.pop(k) for k in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS") if k in os.environ}
    stack = Stack(
        run_dir, console=False, fixed_ports=False, topology="cluster", holders=FAULT_HOLDERS,
        topic_prefix=f"f{run_id}.", fast_db=True,
        extra_env={
            "DB_NAME_PREFIX": f"f{run_id}_",
            "SIGNIN_FREE_FAILURES_PER_ADDRESS": "1000",
            "RESET_REQUESTS_PER_ADDRESS": "1000",
            "CREATE_PER_ADDRESS": "100000",
            "CREATE_PER_CLIENT": "1000",
            # Per-address budgets of issue 16: every request comes from 127.0.0.1 here.
            "SIGNUPS_PER_ADDRESS": "100000",
            "CODE_ATTEMPTS_PER_ADDRESS": "100000",
            # Cheaper hashing keeps hundreds of password changes inside the CI budget on 2 cores.
            "ARGON2_MEMORY_KIB": "8192",
            "ARGON2_TIME_COST": "1",
            "DB_POOL_MAX": "5",
            "LOG_LEVEL": "INFO",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        os.environ.update(saved)
        if request.session.testsfailed:
            _keep_logs(run_dir)  # the cluster's own logs (every replica, broker and holder instance)
        if os.environ.get("HEARTH_KEEP_TEST_RUN") != "1":
            remove_run_dir(run_dir)
