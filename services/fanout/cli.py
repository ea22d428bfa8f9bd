"""The ``hearth fanout`` command."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field

import click
from aiokafka import AIOKafkaConsumer

from shared import stackenv
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


@dataclass
class Revocation:
    id: str
    at: float
    seen: float
    sessions: int
    cause: str
    acks: dict[str, float] = field(default_factory=dict)
    reported: bool = False


class Watcher:
    def __init__(self, deadline: float, expect: set[str], echo: bool = True) -> None:
        self.deadline = deadline
        self.holders: set[str] = set(expect)
        self.revocations: dict[str, Revocation] = {}
        self.early_acks: dict[str, dict[str, float]] = {}
        self.latencies: dict[str, list[float]] = {}
        self.echo = echo

    def say(self, text: str) -> None:
        if self.echo:
            click.echo(text)

    def revoked(self, env: Envelope) -> None:
        rev = decode_data(env, SessionsRevoked)
        r = Revocation(rev.revocation_id, env.occurred_at.timestamp(), time.time(),
                       len(rev.session_ids) or len(rev.account_ids or []), rev.cause)
        r.acks.update(self.early_acks.pop(rev.revocation_id, {}))
        self.revocations[r.id] = r
        scope = f"{len(rev.account_ids)} accounts" if rev.account_ids else f"{len(rev.session_ids)} sessions"
        self.say(f"revocation {r.id[:8]} cause={r.cause} {scope} account={rev.account_id[:8]}")

    def applied(self, env: Envelope) -> None:
        ack = decode_data(env, RevocationApplied)
        self.holders.add(ack.holder_id)
        applied = parse_time(ack.applied_at).timestamp()
        r = self.revocations.get(ack.revocation_id)
        if r is None:
            self.early_acks.setdefault(ack.revocation_id, {})[ack.holder_id] = applied
            return
        if ack.holder_id in r.acks:
            return  # a redelivered acknowledgement
        r.acks[ack.holder_id] = applied
        latency = max(0.0, applied - r.at)
        self.latencies.setdefault(ack.holder_id, []).append(latency)
        self.say(f"  {r.id[:8]} applied by {ack.holder_id} in {latency * 1000:.1f} ms")

    def check_deadlines(self) -> None:
        now = time.time()
        for r in self.revocations.values():
            if r.reported or now - r.seen < self.deadline:
                continue
            r.reported = True
            missing = sorted(self.holders - set(r.acks))
            worst = max((a - r.at for a in r.acks.values()), default=0.0)
            if missing:
                self.say(f"  {r.id[:8]} MISSING after {self.deadline:.1f}s: {', '.join(missing)}")
            else:
                self.say(f"  {r.id[:8]} all {len(r.acks)} holders applied (slowest {worst * 1000:.1f} ms)")

    def summary(self) -> str:
        lines = [f"{'holder':<24}{'applied':>9}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}{'missing':>9}"]
        for holder in sorted(self.holders):
            ms = [v * 1000 for v in self.latencies.get(holder, [])]
            missing = sum(1 for r in self.revocations.values() if holder not in r.acks)
            if ms:
                lines.append(f"{holder:<24}{len(ms):>9}{_quantile(ms, .5):>10.1f}{_quantile(ms, .95):>10.1f}"
                             f"{_quantile(ms, .99):>10.1f}{max(ms):>10.1f}{missing:>9}")
            else:
                lines.append(f"{holder:<24}{0:>9}{'-':>10}{'-':>10}{'-':>10}{'-':>10}{missing:>9}")
        return "\n".join(lines)


@click.command("fanout")
@click.option("--deadline", default=2.0, show_default=True, help="seconds after which missing holders are reported")
@click.option("--expect", multiple=True, help="a holder that must apply every revocation (repeatable)")
@click.option("--from-beginning", is_flag=True, help="replay the retained history instead of following new events")
@click.option("--summary", is_flag=True, help="end with the latency distribution per holder")
@click.option("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
@click.option("--quiet", is_flag=True, help="only the summary")
@click.option("--env-file", default=None, help="KEY=VALUE defaults (default: .run/hearth.env when present)")
def command(deadline: float, expect: tuple[str, ...], from_beginning: bool, summary: bool, duration: float | None,
            quiet: bool, env_file: str | None) -> None:
    """Follow revocations and their acknowledgements by every session holder."""
    try:
        stackenv.load(env_file)
    except stackenv.EnvFileError as exc:
        raise click.ClickException(str(exc)) from exc
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:59092")
    prefix = os.environ.get("TOPIC_PREFIX", "")
    watcher = Watcher(deadline, set(expect), echo=not quiet)
    try:
        asyncio.run(_follow(watcher, bootstrap, prefix, from_beginning, duration))
    except KeyboardInterrupt:
        pass
    if summary or quiet:
        click.echo(watcher.summary())


async def _follow(w: Watcher, bootstrap: str, prefix: str, from_beginning: bool, duration: float | None) -> None:
    consumer = AIOKafkaConsumer(prefix + SESSIONS_REVOKED, prefix + REVOCATIONS_APPLIED, bootstrap_servers=bootstrap,
                                group_id=f"{prefix}fanout-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                                auto_offset_reset="earliest" if from_beginning else "latest", fetch_max_wait_ms=50)
    await consumer.start()
    stop = time.monotonic() + duration if duration else None
    try:
        while stop is None or time.monotonic() < stop:
            batches = await consumer.getmany(timeout_ms=200)
            records = sorted((r for rs in batches.values() for r in rs), key=lambda r: r.timestamp)
            for rec in records:
                try:
                    env = Envelope.decode(rec.value)
                except ValueError:
                    continue
                if env.type == SessionsRevoked.TYPE:
                    w.revoked(env)
                elif env.type == RevocationApplied.TYPE:
                    w.applied(env)
            w.check_deadlines()
    finally:
        await consumer.stop()
