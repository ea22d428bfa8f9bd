"""The ``hearth fanout`` command: which holder instances applied each revocation, and how fast.

It reads ``sessions.revoked`` and ``revocations.applied`` with the same consume loop the holder kit
uses (:class:`shared.consumer.ConsumeLoop`, broadcast mode: every partition, no consumer group, so
watching leaves nothing behind on the brokers). Acknowledgements name the holder and the instance;
a holder's instances are those seen acknowledging during the watch (plus ``--expect NAME=N``), so a
revocation applied by one of two instances of ``web`` is reported as ``web: 1 of 2 instances``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import click
from aiokafka import ConsumerRecord, TopicPartition

from shared import stackenv
from shared.consumer import ConsumeLoop
from shared.events import (
    REVOCATIONS_APPLIED,
    SESSIONS_REVOKED,
    Envelope,
    RevocationApplied,
    SessionsRevoked,
    decode_data,
    parse_time,
)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


Instance = tuple[str, str]  # (holder, instance)


@dataclass
class Revocation:
    id: str
    at: float
    seen: float
    sessions: int
    cause: str
    acks: dict[Instance, float] = field(default_factory=dict)
    reported: bool = False


class Watcher:
    def __init__(self, deadline: float, expect: dict[str, int] | set[str], echo: bool = True) -> None:
        self.deadline = deadline
        self.expected: dict[str, int] = dict.fromkeys(expect, 1) if isinstance(expect, set) else dict(expect)
        self.instances: dict[str, set[str]] = {h: set() for h in self.expected}
        self.revocations: dict[str, Revocation] = {}
        self.early_acks: dict[str, dict[Instance, float]] = {}
        self.latencies: dict[Instance, list[float]] = {}
        self.echo = echo

    @property
    def holders(self) -> set[str]:
        return set(self.instances)

    def say(self, text: str) -> None:
        if self.echo:
            click.echo(text)

    def revoked(self, env: Envelope) -> None:
        rev = decode_data(env, SessionsRevoked)
        if rev.revocation_id in self.revocations:
            return
        r = Revocation(rev.revocation_id, env.occurred_at.timestamp(), time.time(),
                       len(rev.session_ids) or len(rev.account_ids or []), rev.cause)
        for who, applied in self.early_acks.pop(rev.revocation_id, {}).items():
            self._record(r, who, applied)
        self.revocations[r.id] = r
        scope = f"{len(rev.account_ids)} accounts" if rev.account_ids else f"{len(rev.session_ids)} sessions"
        self.say(f"revocation {r.id[:8]} cause={r.cause} {scope} account={rev.account_id[:8]}")

    def applied(self, env: Envelope) -> None:
        ack = decode_data(env, RevocationApplied)
        who = (ack.holder_id, ack.instance_id or "-")
        self.instances.setdefault(who[0], set()).add(who[1])
        applied = parse_time(ack.applied_at).timestamp()
        r = self.revocations.get(ack.revocation_id)
        if r is None:
            self.early_acks.setdefault(ack.revocation_id, {})[who] = applied
            return
        self._record(r, who, applied)

    def _record(self, r: Revocation, who: Instance, applied: float) -> None:
        if who in r.acks:
            return  # a redelivered acknowledgement
        r.acks[who] = applied
        latency = max(0.0, applied - r.at)
        self.latencies.setdefault(who, []).append(latency)
        self.say(f"  {r.id[:8]} applied by {who[0]}/{who[1]} in {latency * 1000:.1f} ms")

    def expected_instances(self, holder: str) -> int:
        return max(self.expected.get(holder, 0), len(self.instances.get(holder, ())))

    def missing(self, r: Revocation) -> dict[str, tuple[int, int]]:
        """Holders that did not apply ``r`` on every instance: holder -> (applied on, of)."""
        out = {}
        for holder in sorted(self.instances):
            done = sum(1 for h, _ in r.acks if h == holder)
            want = self.expected_instances(holder)
            if done < want:
                out[holder] = (done, want)
        return out

    def check_deadlines(self) -> None:
        now = time.time()
        for r in self.revocations.values():
            if r.reported or now - r.seen < self.deadline:
                continue
            r.reported = True
            missing = self.missing(r)
            worst = max((a - r.at for a in r.acks.values()), default=0.0)
            if missing:
                text = ", ".join(f"{h} (applied on {d} of {w} instances)" for h, (d, w) in missing.items())
                self.say(f"  {r.id[:8]} MISSING after {self.deadline:.1f}s: {text}")
            else:
                self.say(f"  {r.id[:8]} all {len(self.instances)} holders applied on all {len(r.acks)} instances"
                         f" (slowest {worst * 1000:.1f} ms)")

    def summary(self) -> str:
        lines = [f"{'holder/instance':<36}{'applied':>9}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}"
                 f"{'missing':>9}"]
        for holder in sorted(self.instances):
            names = sorted(self.instances[holder]) or ["?"]
            for inst in names:
                who = (holder, inst)
                ms = [v * 1000 for v in self.latencies.get(who, [])]
                missing = sum(1 for r in self.revocations.values() if who not in r.acks)
                label = f"{holder}/{inst}"
                if ms:
                    lines.append(f"{label:<36}{len(ms):>9}{_quantile(ms, .5):>10.1f}{_quantile(ms, .95):>10.1f}"
                                 f"{_quantile(ms, .99):>10.1f}{max(ms):>10.1f}{missing:>9}")
                else:
                    lines.append(f"{label:<36}{0:>9}{'-':>10}{'-':>10}{'-':>10}{'-':>10}{missing:>9}")
        complete = sum(1 for r in self.revocations.values() if not self.missing(r))
        lines.append(f"{len(self.revocations)} revocations, {complete} applied by every instance of every holder")
        return "\n".join(lines)


def _parse_expect(values: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        name, _, n = v.partition("=")
        try:
            out[name] = int(n) if n else 1
        except ValueError:
            raise click.BadParameter(f"{v!r}: use NAME or NAME=INSTANCES") from None
    return out


@click.command("fanout")
@click.option("--deadline", default=2.0, show_default=True, help="seconds after which missing holders are reported")
@click.option("--expect", multiple=True, help="NAME or NAME=INSTANCES: a holder that must apply every revocation "
              "on that many instances (repeatable)")
@click.option("--from-beginning", is_flag=True, help="replay the retained history instead of following new events")
@click.option("--summary", is_flag=True, help="end with the latency distribution per holder instance")
@click.option("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
@click.option("--quiet", is_flag=True, help="only the summary")
@click.option("--env-file", default=None, help="KEY=VALUE defaults (default: .run/hearth.env when present)")
def command(deadline: float, expect: tuple[str, ...], from_beginning: bool, summary: bool, duration: float | None,
            quiet: bool, env_file: str | None) -> None:
    """Follow revocations and their acknowledgements by every session holder instance."""
    try:
        stackenv.load(env_file)
    except stackenv.EnvFileError as exc:
        raise click.ClickException(str(exc)) from exc
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:59092")
    prefix = os.environ.get("TOPIC_PREFIX", "")
    watcher = Watcher(deadline, _parse_expect(expect), echo=not quiet)
    try:
        asyncio.run(follow(watcher, bootstrap, prefix, from_beginning, duration))
    except KeyboardInterrupt:
        pass
    if summary or quiet:
        click.echo(watcher.summary())


async def follow(w: Watcher, bootstrap: str, prefix: str, from_beginning: bool, duration: float | None,
                 ready: asyncio.Event | None = None) -> None:
    async def on_records(tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        for rec in records:
            try:
                env = Envelope.decode(rec.value)
            except ValueError:
                continue
            if env.type == SessionsRevoked.TYPE:
                w.revoked(env)
            elif env.type == RevocationApplied.TYPE:
                w.applied(env)

    loop = ConsumeLoop(bootstrap=bootstrap, topics=[prefix + SESSIONS_REVOKED, prefix + REVOCATIONS_APPLIED],
                       group=None, start="earliest" if from_beginning else "latest", name="fanout",
                       on_records=on_records, fetch_max_wait_ms=50, poll_timeout_ms=200, client_id="hearth-fanout")
    loop.start()
    stop = time.monotonic() + duration if duration else None
    try:
        await loop.started.wait()
        if ready is not None:
            ready.set()
        while stop is None or time.monotonic() < stop:
            await asyncio.sleep(0.1)
            w.check_deadlines()
    finally:
        with contextlib.suppress(Exception):
            await loop.stop(wait=2.0)
