"""Password hashing: argon2id (argon2-cffi) off the event loop, with an optional pepper.

- Default cost: 19 MiB, 2 passes, parallelism 1 (OWASP's minimum for argon2id); configurable.
- Hashing runs in a thread pool of ``concurrency`` workers (argon2-cffi releases the GIL), and a
  semaphore bounds how many hashes are in flight, since each one holds its memory cost. By default
  (``concurrency=0``) there is one worker per CPU this process may use, within a cap and a cgroup
  memory limit (:func:`auto_concurrency`): more hashing threads than cores only adds preemptions
  and cache misses to every hash.
- Pepper: the password is first keyed with HMAC-SHA256 under a server secret that never enters the
  database, so a stolen database alone cannot be cracked. The stored record is
  ``<pepper key id>$<argon2 hash>`` (``-`` when no pepper), so peppers can rotate: an old record
  verifies with its own key and is rehashed under the current one at the next sign-in.
- ``nice``: the hashing threads run that much below normal priority, so that under saturation the
  event loop, PostgreSQL, the proxy and the other services preempt a hash as soon as they wake.
  Throughput is unchanged (the hashes still get every idle cycle); request latency beside a
  saturated sign-in drops (the README's benchmark section has the measured figures).
- ``verify_dummy`` burns the same time as a real verification, for unknown logins.
- ``in_flight`` counts hashes handed to the threads and not yet finished; ``on_settled`` callbacks
  run (on the event loop, after the finishing caller has moved on) each time one finishes;
  ``hash_seconds`` is a moving average of one hash's time on its thread. Sign-in's mint batcher
  uses them to know whether more sign-ins are about to need a session, and how soon.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from prometheus_client import Counter

T = TypeVar("T")


@dataclass(frozen=True)
class HashParams:
    memory_kib: int = 19 * 1024
    time_cost: int = 2
    parallelism: int = 1


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    needs_rehash: bool


def _lower_priority(nice: int) -> None:
    """Raise this hashing thread's nice value (Linux schedules threads one by one), so that request
    handling on the same cores preempts a running hash at once instead of waiting out its slice."""
    if nice > 0:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except (AttributeError, OSError):  # not Linux, or not allowed: hash at normal priority
            pass


AUTO_CONCURRENCY_MAX = 8  # the automatic thread count never exceeds this (each hash holds its memory)


def _cgroup_file(name: str) -> str | None:
    """The content of this process's cgroup v2 file ``name`` (``cpu.max``, ``memory.max``), if any."""
    try:
        with open("/proc/self/cgroup") as fh:
            path = next((line.strip().split(":", 2)[2] for line in fh if line.startswith("0::")), None)
        if path is None:
            return None
        with open(f"/sys/fs/cgroup{path.rstrip('/')}/{name}") as fh:
            return fh.read().strip()
    except OSError:
        return None


def auto_concurrency(memory_kib: int) -> int:
    """Hashing threads when ``ARGON2_CONCURRENCY`` is 0: one per usable CPU, at most
    :data:`AUTO_CONCURRENCY_MAX`, and no more than a quarter of a cgroup memory limit
    (``memory.max``, a pod's ``limits.memory``) can hold at ``memory_kib`` each; at least 1."""
    threads = min(usable_cpus(), AUTO_CONCURRENCY_MAX)
    limit = _cgroup_file("memory.max")
    if limit and limit.isdigit():
        threads = min(threads, int(limit) // 4 // (memory_kib * 1024))
    return max(1, threads)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (``cpu.max``, as a container's or pod's CPU limit sets it), rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = (_cgroup_file("cpu.max") or "max").split()
    if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]) > 0:
        cpus = min(cpus, -(-int(quota[0]) // int(quota[1])))
    return max(1, cpus)


def cpu_share(replicas: int) -> int:
    """Each of ``replicas`` co-located auth processes' share of this machine's usable CPUs (at least 1)."""
    return max(1, usable_cpus() // replicas)


# Every argon2 computation (hash, verify, dummy verify): lets a test count what a throttle let through.
HASHES = Counter("hearth_password_hashes_total", "argon2 computations started (hash, verify, dummy verify)")


class Passwords:
    def __init__(
        self,
        params: HashParams = HashParams(),
        *,
        peppers: dict[str, bytes] | None = None,
        concurrency: int = 0,
        nice: int = 0,
    ) -> None:
        self.params = params
        concurrency = concurrency or auto_concurrency(params.memory_kib)
        self.concurrency = concurrency
        self.hasher = PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self.peppers = peppers or {}
        self.current_pepper = next(iter(self.peppers), None)
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="argon2",
                                           initializer=_lower_priority, initargs=(nice,))
        self.slots = asyncio.Semaphore(concurrency * 2)
        self.in_flight = 0
        self.on_settled: list[Callable[[], None]] = []
        self.hash_seconds = 0.0  # a moving average of one hash's time on its thread (0 until the first)
        self._dummy = self._hash_sync("hearth dummy password for timing", self.current_pepper)

    def _prepare(self, password: str, pepper_id: str | None) -> str:
        if pepper_id is None:
            return password
        key = self.peppers.get(pepper_id)
        if key is None:
            raise KeyError(pepper_id)
        mac = hmac.new(key, password.encode(), hashlib.sha256).digest()
        return base64.b64encode(mac).decode()

    def _hash_sync(self, password: str, pepper_id: str | None) -> str:
        return f"{pepper_id or '-'}${self.hasher.hash(self._prepare(password, pepper_id))}"

    def _verify_sync(self, record: str, password: str) -> VerifyResult:
        pepper_id, sep, phc = record.partition("$")
        if not sep:
            return VerifyResult(False, False)
        pid = None if pepper_id == "-" else pepper_id
        try:
            prepared = self._prepare(password, pid)
        except KeyError:
            return VerifyResult(False, False)
        try:
            self.hasher.verify(phc, prepared)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return VerifyResult(False, False)
        stale = self.hasher.check_needs_rehash(phc) or pid != self.current_pepper
        return VerifyResult(True, stale)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        HASHES.inc()
        async with self.slots:
            loop = asyncio.get_running_loop()
            self.in_flight += 1
            try:
                return await loop.run_in_executor(self.executor, self._timed, fn, *args)
            finally:
                self.in_flight -= 1
                for callback in self.on_settled:
                    loop.call_soon(callback)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            took = time.perf_counter() - started
            # One float store (atomic under the GIL); a lost update between threads costs nothing.
            self.hash_seconds = took if not self.hash_seconds else self.hash_seconds * 0.9 + took * 0.1

    async def hash(self, password: str) -> str:
        return await self._run(self._hash_sync, password, self.current_pepper)

    async def verify(self, record: str, password: str) -> VerifyResult:
        return await self._run(self._verify_sync, record, password)

    async def verify_dummy(self, password: str) -> None:
        """Same cost as a real verify; used when the login is unknown."""
        await self._run(self._verify_sync, self._dummy, password)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
