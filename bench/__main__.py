"""python -m bench [NAME ...]: start the stack on free ports, run the benchmarks, print a table."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import time
import traceback
import uuid
from pathlib import Path

from bench.common import Row, table
from deploy.launcher import ROOT, Stack, remove_run_dir

# Benchmark modules, in the order they run. Each exposes NAME and `async def run(stack)`.
MODULES = ["bench.backbone", "bench.signin", "bench.two_factor", "bench.fanout", "bench.linkcode", "bench.notification",
           "bench.breach"]
# Run afterwards on a stack of their own: the cluster topology (issue 17).
CLUSTER_MODULES = ["bench.cluster"]


def available() -> list[str]:
    return [m for m in MODULES if (ROOT / (m.replace(".", "/") + ".py")).exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all), e.g. backbone signin")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()
    mods = [m for m in available() if not args.names or m.split(".")[1] in args.names]
    cluster_mods = [m for m in CLUSTER_MODULES if not args.names or m.split(".")[1] in args.names]
    run_dir = ROOT / ".run" / f"bench-{uuid.uuid4().hex[:6]}"
    holders = tuple(f"h{i:02d}" for i in range(20)) if (ROOT / "services/holder/cli.py").exists() else ()
    stack = Stack(run_dir, console=False, fixed_ports=False, holders=holders, topic_prefix="bench.",
                  extra_env={"LOG_LEVEL": "WARNING", "DB_NAME_PREFIX": "bench_",
                             # load comes from one address: lift the per-address limits for the run
                             "RESET_REQUESTS_PER_ADDRESS": "10000000", "RESET_REQUESTS_PER_EMAIL": "10000000",
                             "CREATE_PER_ADDRESS": "10000000", "CREATE_PER_CLIENT": "10000000",
                             "SIGNIN_FREE_FAILURES_PER_ADDRESS": "10000000",
                             # the sink is local: measure notification's own throughput, not a provider's cap
                             "SMTP_RATE": "5000", "SMTP_CONCURRENCY": "8", "DB_POOL_MAX": "20"})
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    rows: list[Row] = []
    if mods:
        rows += run_stack(stack, mods, len(holders), args.keep)
    else:
        remove_run_dir(run_dir)
    if cluster_mods:
        cluster = Stack(ROOT / ".run" / f"bench-cluster-{uuid.uuid4().hex[:6]}", console=False, fixed_ports=False,
                        holders=holders, topic_prefix="benchc.", topology="cluster",
                        extra_env={**stack.extra_env, "DB_NAME_PREFIX": "benchc_", "DB_POOL_MAX": "10"})
        rows += run_stack(cluster, cluster_mods, len(holders), args.keep)
    print()
    print(table(rows))
    out = ROOT / "artifacts" / "bench.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table(rows) + "\n")
    print(f"\n(written to {Path(out).relative_to(ROOT)})")


def run_stack(stack: Stack, mods: list[str], holders: int, keep: bool) -> list[Row]:
    run_dir = stack.run_dir
    started = time.monotonic()
    stack.start()
    print(f"{stack.topology} stack up in {time.monotonic() - started:.1f}s ({holders} sample holders, "
          f"{stack.holder_instances} instances each)")
    # The broker's JVM compiles its hot paths during its first half-minute (measured: 10-11% of a
    # core idle then, 5% after); let it settle so it does not load the first benchmark alone.
    time.sleep(float(os.environ.get("BENCH_SETTLE", "30")))
    rows: list[Row] = []
    try:
        for name in mods:
            module = importlib.import_module(name)
            print(f"running {module.NAME} ...", flush=True)
            t0 = time.monotonic()
            try:
                rows += asyncio.run(module.run(stack))
            except Exception:
                traceback.print_exc()
                rows.append(Row(module.NAME, "FAILED (see above)", float("nan"), ""))
            print(f"  {module.NAME} took {time.monotonic() - t0:.1f}s", flush=True)
    finally:
        stack.stop()
        if not keep:
            remove_run_dir(run_dir)
    return rows


if __name__ == "__main__":
    main()
