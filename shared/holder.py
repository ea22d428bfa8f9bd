"""The holder kit: what any resource server embeds to hold Hearth sessions safely.

``HolderKit.validate(token)`` answers from a bounded TTL cache, else asks devicesession's RFC 7662
introspection endpoint with the holder's credentials. A background reader of ``sessions.revoked``
evicts every cached entry an event covers (by session id, or by account for bulk and "all sessions"
revocations) and acknowledges each with a ``revocation.applied`` event naming the holder **and this
instance** (``instance_id``).

Every instance reads every revocation. Replicas of one holder (two pods of ``web``, two processes
of ``hearth holder --name X``) each keep their own cache, so each must apply every revocation. The
kit therefore reads **every partition** of ``sessions.revoked`` itself, with no consumer group
(:class:`shared.consumer.ConsumeLoop` in broadcast mode), starting at the end of the log. It does
not use a consumer group per instance: that would need a stable id per instance plus the deletion
of the groups of instances that died (a Deployment would leave an orphan group per pod it ever ran),
and what a group buys, resuming from a committed offset, is of no use to a cache that must start
empty anyway. Without a group nothing is left behind and a sibling's start or death never causes a
rebalance pause here.

Safety rules:

- A new instance starts with an empty cache, and caches nothing until its position at the end of
  every partition is resolved (a revocation published after that point is read; anything before
  it concerns tokens this instance never cached).
- It never serves a token revoked after it started: every revocation is read in offset order; an
  introspection answer that raced with a revocation (one was applied while the request was in
  flight) is not cached and is asked again.
- A gap it cannot rule out drops its cache: a record that is not the one after the last on its
  partition, a position that fell out of the retained log, partitions added to the topic, a failure
  of the reader, an undecodable revocation. While the reader has not heard from every partition's
  leader within ``max_staleness`` seconds (a broker down), ``validate`` does not use the cache at
  all (introspection answers), and the cache is dropped.
- Negative answers are cached briefly (``negative_ttl``) so a flood of bad tokens cannot hammer
  introspection.
- The cache is keyed by a local SHA-256 of the token; no plaintext token is kept.

``on_revocation`` is for the holder's own in-memory state; it runs in every instance. Durable state
that a revocation changes belongs in a group consumer (:class:`shared.consumer.ConsumerRunner`),
which applies it once per holder, not once per instance.

Instance ids: ``INSTANCE_ID``, else ``POD_NAME`` (Kubernetes' downward API), else
``<hostname>-<pid>`` (a container's hostname is its name or id). See docs/INTERNAL-API.md for the
holder credentials (``holder_id`` and ``holder_secret(master, holder_id)``, HTTP Basic).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from shared import kafka, logs
from shared.consumer import ConsumeLoop
from shared.errors import Unavailable
from shared.events import (
    REVOCATIONS_APPLIED,
    SESSIONS_REVOKED,
    Envelope,
    RevocationApplied,
    SessionsRevoked,
    decode_data,
    envelope,
    iso,
    parse_time,
    utcnow,
)

log = logging.getLogger(__name__)

_L = ["holder", "instance"]
CACHE_LOOKUPS = Counter("hearth_holder_cache_lookups_total", "validate() lookups", [*_L, "result"])
REVOCATIONS_APPLIED_TOTAL = Counter("hearth_holder_revocations_applied_total", "Revocations applied", _L)
EVICTIONS = Counter("hearth_holder_evictions_total", "Cache entries evicted by revocations", _L)
CACHE_DROPS = Counter("hearth_holder_cache_drops_total", "Whole-cache drops (start, gap, stall, failure)", _L)
APPLY_LATENCY = Histogram(
    "hearth_holder_apply_latency_seconds",
    "Time from a revocation's occurrence to this holder instance applying it",
    _L,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CACHE_SIZE = Gauge("hearth_holder_cache_entries", "Cached tokens", _L)


INSTANCE_HEADER = "X-Hearth-Instance"


def instance_id() -> str:
    """This process's instance id: INSTANCE_ID, else POD_NAME, else <hostname>-<pid>."""
    for var in ("INSTANCE_ID", "POD_NAME"):
        value = os.environ.get(var, "").strip()
        if value:
            return value[:200]
    return f"{socket.gethostname()}-{os.getpid()}"[:200]


def holder_secret(master: str, holder_id: str) -> str:
    """The introspection credential of ``holder_id``, derived from the master HOLDER_SECRET."""
    mac = hmac.new(master.encode(), b"holder:" + holder_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


class IntrospectionUnavailable(Unavailable):
    """devicesession could not be asked (down, restarting, overloaded): answer 503, retry later."""


@dataclass(frozen=True)
class Principal:
    account_id: str
    session_id: str
    device_id: int
    client_id: str
    kind: str
    issued_at: float


@dataclass
class _Entry:
    principal: Principal | None
    expires: float


class HolderKit:
    def __init__(
        self,
        *,
        holder_id: str,
        introspect_url: str,
        holder_secret: str,
        bootstrap: str,
        topic_prefix: str = "",
        producer: AIOKafkaProducer | None = None,
        cache_ttl: float = 30.0,
        negative_ttl: float = 5.0,
        max_entries: int = 100_000,
        timeout: float = 5.0,
        on_revocation: Callable[[SessionsRevoked], Awaitable[None]] | None = None,
        instance: str | None = None,
        max_staleness: float = 5.0,
    ) -> None:
        self.holder_id = holder_id
        self.instance_id = instance or instance_id()
        self.max_staleness = max_staleness
        self._labels = (holder_id, self.instance_id)
        # validate()'s counters, bound once: a labels() lookup cost more than the cached path's own work
        self._lookups = {result: CACHE_LOOKUPS.labels(*self._labels, result)
                         for result in ("hit", "negative_hit", "miss")}
        self.introspect_url = introspect_url
        self.auth = aiohttp.BasicAuth(holder_id, holder_secret)
        self.bootstrap = bootstrap
        self.topic_prefix = topic_prefix
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.on_revocation = on_revocation
        self._producer = producer
        self._own_producer = producer is None
        # Per-process by design (issue 17): each instance's cache is kept honest by its own reader of
        # every revocation, under the safety rules of the module docstring.
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._by_session: dict[str, set[bytes]] = {}
        self._by_account: dict[str, set[bytes]] = {}
        self._seq = 0  # bumped on every applied revocation and every drop
        self._inflight: dict[bytes, asyncio.Future[Principal | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: ConsumeLoop | None = None
        self.assigned = asyncio.Event()  # positioned at the end of every partition once
        self.applied: list[tuple[str, float]] = []  # (revocation id, monotonic time) for tests and benches

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self.timeout,
                                              connector=aiohttp.TCPConnector(limit=200, keepalive_timeout=60))
        if self._producer is None:
            self._producer = kafka.make_producer(self.bootstrap, client_id=f"holder-{self.holder_id}")
            await kafka.start_producer(self._producer)
        await kafka.ensure_topics(self.bootstrap, [self.topic_prefix + SESSIONS_REVOKED,
                                                   self.topic_prefix + REVOCATIONS_APPLIED])
        self._loop = ConsumeLoop(
            bootstrap=self.bootstrap, topics=[self.topic_prefix + SESSIONS_REVOKED], group=None, start="latest",
            name=f"holder-{self.holder_id}", on_records=self._records, on_reset=self._on_reset,
            # An idle holder should cost next to nothing: a long poll (the broker answers as soon as a
            # revocation arrives, so the wait adds no latency) and metadata once a minute (200 kits on
            # 2 cores otherwise eat the CPU that sign-ins need). The fetch wait stays well inside
            # max_staleness: every partition is heard from at least every 1.5 s while all is well.
            fetch_max_wait_ms=min(1500, int(self.max_staleness * 300)), poll_timeout_ms=1000,
            metadata_max_age_ms=60_000,
            max_staleness=self.max_staleness, client_id=f"holder-{self.holder_id}-{self.instance_id}",
        )
        self._loop.start()

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop(wait=2.0)
        if self._session is not None:
            await self._session.close()
        if self._own_producer and self._producer is not None:
            await self._producer.stop()

    @property
    def healthy(self) -> bool:
        """Whether the cache may be used: positioned, and every partition heard from recently."""
        return self._loop is not None and self._loop.fresh

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    async def validate(self, token: str | None) -> Principal | None:
        """The principal of a live token, or None. Never raises for a bad token."""
        if not token or len(token) > 512:
            return None
        key = self._key(token)
        now = time.monotonic()
        if self.healthy:
            entry = self._cache.get(key)
            if entry is not None and entry.expires > now:
                self._cache.move_to_end(key)
                self._lookups["hit" if entry.principal else "negative_hit"].inc()
                return entry.principal
        self._lookups["miss"].inc()
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            principal = await self._lookup(key, token)
            fut.set_result(principal)
            return principal
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._inflight.pop(key, None)

    async def introspect(self, token: str) -> Principal | None:
        """Ask devicesession now, bypassing the cache: for a credential derived from a session
        (a claim token) whose use must not race the revocation's arrival here."""
        if not token or len(token) > 512:
            return None
        return await self._introspect(token)

    async def _lookup(self, key: bytes, token: str) -> Principal | None:
        for _ in range(3):
            seq = self._seq
            principal = await self._introspect(token)
            if seq == self._seq:
                if self.healthy:
                    self._store(key, principal)
                return principal
            # A revocation was applied while we asked: the answer may predate it. Ask again.
        return await self._introspect(token)

    async def _introspect(self, token: str) -> Principal | None:
        """Ask devicesession. Raises :class:`IntrospectionUnavailable` (a 503 in Hearth's services)
        when it cannot answer: a holder never guesses about a token."""
        assert self._session is not None, "HolderKit.start() was not called"
        try:
            # The instance header tells devicesession which instance may now cache this answer, so a
            # sign-out can wait for exactly the instances that could still accept the token.
            async with self._session.post(self.introspect_url, data={"token": token}, auth=self.auth,
                                          headers={INSTANCE_HEADER: self.instance_id}) as resp:
                if resp.status != 200:
                    log.warning("introspection failed", extra={"holder": self.holder_id, "status": resp.status})
                    raise IntrospectionUnavailable()
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("introspection failed", extra={"holder": self.holder_id, "error": type(exc).__name__})
            raise IntrospectionUnavailable() from exc
        if not body.get("active"):
            return None
        return Principal(
            account_id=str(body["account_id"]),
            session_id=str(body["session_id"]),
            device_id=int(body["device_id"]),
            client_id=str(body.get("client_id", "")),
            kind=str(body.get("kind", "")),
            issued_at=float(body.get("iat", 0)),
        )

    def _store(self, key: bytes, principal: Principal | None) -> None:
        ttl = self.cache_ttl if principal else self.negative_ttl
        old = self._cache.pop(key, None)
        if old is not None:
            self._unindex(key, old)
        self._cache[key] = _Entry(principal, time.monotonic() + ttl)
        if principal:
            self._by_session.setdefault(principal.session_id, set()).add(key)
            self._by_account.setdefault(principal.account_id, set()).add(key)
        while len(self._cache) > self.max_entries:
            k, e = self._cache.popitem(last=False)
            self._unindex(k, e)
        CACHE_SIZE.labels(*self._labels).set(len(self._cache))

    def _unindex(self, key: bytes, entry: _Entry) -> None:
        p = entry.principal
        if p is None:
            return
        for index, ident in ((self._by_session, p.session_id), (self._by_account, p.account_id)):
            keys = index.get(ident)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[ident]

    def forget(self, token: str) -> None:
        """Drop one token's cached answer (the service that revoked it knows before the event)."""
        self._seq += 1
        key = self._key(token)
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._unindex(key, entry)
            CACHE_SIZE.labels(*self._labels).set(len(self._cache))

    def drop_cache(self, why: str) -> None:
        """Forget everything (restart, rebalance, or a gap in the revocation stream)."""
        self._seq += 1
        self._cache.clear()
        self._by_session.clear()
        self._by_account.clear()
        CACHE_DROPS.labels(*self._labels).inc()
        CACHE_SIZE.labels(*self._labels).set(0)
        log.info("holder cache dropped", extra={"holder": self.holder_id, "instance": self.instance_id, "why": why})

    # ------------------------------------------------------------------ revocations

    def apply(self, rev: SessionsRevoked) -> int:
        """Evict what a revocation covers; returns how many cache entries went."""
        self._seq += 1
        keys: set[bytes] = set()
        for sid in rev.session_ids:
            keys |= self._by_session.get(sid, set())
        accounts = list(rev.account_ids or [])
        if rev.all_sessions and not accounts:
            accounts = [rev.account_id]
        if accounts:
            cutoff = parse_time(rev.cutoff).timestamp()
            for acct in accounts:
                for k in self._by_account.get(acct, set()):
                    e = self._cache.get(k)
                    if e is not None and e.principal is not None and e.principal.issued_at <= cutoff:
                        keys.add(k)
        for k in keys:
            e = self._cache.pop(k, None)
            if e is not None:
                self._unindex(k, e)
        EVICTIONS.labels(*self._labels).inc(len(keys))
        CACHE_SIZE.labels(*self._labels).set(len(self._cache))
        return len(keys)

    async def _on_reset(self, why: str) -> None:
        self.drop_cache(why)
        if why == "positioned":
            self.assigned.set()

    async def _records(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        for record in records:
            await self._handle(record.value)

    async def _handle(self, raw: bytes) -> None:
        try:
            env = Envelope.decode(raw)
            rev = decode_data(env, SessionsRevoked)
        except (ValueError, TypeError):
            # We cannot tell what it covered: trust nothing we hold.
            self.drop_cache("undecodable revocation")
            return
        with logs.handling_event(str(env.id), env.trace):
            await self._applied(env, rev)

    async def _applied(self, env: Envelope, rev: SessionsRevoked) -> None:
        """Evict what ``rev`` covers, run the holder's own hook, acknowledge (with the revocation's trace)."""
        evicted = self.apply(rev)
        if self.on_revocation is not None:
            # The holder's own in-memory state. It must not be skipped: retry, and if it keeps failing
            # the reader restarts (its cache dropped, like any gap).
            for attempt in range(5):
                try:
                    await self.on_revocation(rev)
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    log.warning("on_revocation failed; retrying", exc_info=True, extra={"holder": self.holder_id})
                    await asyncio.sleep(0.1 * 2 ** attempt)
        now = utcnow()
        self.applied.append((rev.revocation_id, time.monotonic()))
        if len(self.applied) > 100_000:
            del self.applied[:50_000]
        REVOCATIONS_APPLIED_TOTAL.labels(*self._labels).inc()
        log.info("revocation applied", extra={"holder": self.holder_id, "instance": self.instance_id,
                                               "revocation_id": rev.revocation_id, "evicted": evicted})
        APPLY_LATENCY.labels(*self._labels).observe(max(0.0, (now - env.occurred_at).total_seconds()))
        ack = envelope(
            RevocationApplied(holder_id=self.holder_id, revocation_id=rev.revocation_id, applied_at=iso(now),
                              revoked_at=iso(env.occurred_at), evicted=evicted, instance_id=self.instance_id),
            producer=f"holder-{self.holder_id}",
            key=rev.revocation_id,
        )
        assert self._producer is not None
        # Fire and forget: the ack is observability; holding revocations back for it is worse.
        # Keyed by revocation id, so one revocation's acks from every instance share a partition.
        await self._producer.send(self.topic_prefix + REVOCATIONS_APPLIED, ack.encode(), key=ack.key.encode(),
                                  headers=ack.headers())


HOLDER = web.AppKey("holder", HolderKit)


def holder_ctx_factory(
    holder_id: str,
    on_revocation: Callable[[web.Application], Callable[[SessionsRevoked], Awaitable[None]]] | None = None,
) -> object:
    """A cleanup_ctx generator that runs a HolderKit for ``holder_id`` under ``app[HOLDER]``;
    ``on_revocation(app)`` builds an optional callback applied to each revocation before its ack."""
    from shared.app import PRODUCER, SETTINGS, add_ready_check

    async def holder_ctx(app: web.Application) -> AsyncIterator[None]:
        s = app[SETTINGS]
        kit = HolderKit(
            holder_id=holder_id,
            introspect_url=s.devicesession_url.rstrip("/") + "/oauth/introspect",
            holder_secret=holder_secret(s.holder_secret.get_secret_value(), holder_id),
            bootstrap=s.kafka_bootstrap_servers,
            topic_prefix=s.topic_prefix,
            producer=app.get(PRODUCER),
            on_revocation=on_revocation(app) if on_revocation else None,
        )
        await kit.start()
        app[HOLDER] = kit

        async def ready() -> bool:
            # Positioned once. Not "fresh": a broker that is down for a while makes every replica
            # stale at once, and validate then answers by introspection, so it must not take every
            # replica out of service.
            return kit.assigned.is_set()

        add_ready_check(app, f"holder:{holder_id}", ready)
        yield
        await kit.stop()

    return holder_ctx

