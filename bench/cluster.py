"""The cluster topology (issue 17): three brokers at replication factor 3 / min.insync.replicas=2,
two replicas of every service, 20 sample holders with two instances each.

- Fan-out to every holder instance: for every (revocation, holder instance) pair, the time from
  the password-change HTTP response to that instance having evicted the old tokens (its
  ``revocation.applied``, which names the instance), beside the brokers' own produce (acks=all)
  -> consume time on an RF 3 topic in the same run. The single-broker figure is ``fanout`` in the
  same ``make bench`` run.
- Fan-out to 200 holder instances: the 40 processes plus 160 kits in this process (many kits per
  process), 50 changes; how p99 grows from 40 to 200 instances.
- Sign-in throughput with two auth replicas behind nginx beside raw argon2 on the same cores
  (``bench.signin`` run against this stack).

``run(stack)`` expects the cluster stack; ``python -m bench cluster`` starts one.
"""

from __future__ import annotations

import asyncio
import os

from bench import fanout as single
from bench.common import Row, broker_round_trip, summary_ms
from deploy.launcher import Stack
from shared.holder import HolderKit, holder_secret

NAME = "cluster"
CHANGES = 200
EXTRA_KITS = 160


async def run(stack: Stack) -> list[Row]:
    os.environ.setdefault("TOPIC_REPLICATION_FACTOR", stack.env.get("TOPIC_REPLICATION_FACTOR", "1"))
    os.environ.setdefault("TOPIC_MIN_INSYNC_REPLICAS", stack.env.get("TOPIC_MIN_INSYNC_REPLICAS", ""))
    plain = await single.seed(stack)
    ids = list(plain)
    first, second = ids[:CHANGES], ids[CHANGES:CHANGES + 50]
    await single.warm_holders(stack, stack.holders, [plain[a][1:] for a in first + second])
    expected = single.instances(stack, stack.holders)
    fan40 = await single.change_and_wait(stack, plain, first, expected)
    ref = summary_ms(await broker_round_trip(stack.kafka_bootstrap))
    r40 = summary_ms(fan40.from_response)
    n = len(expected)
    rows = [
        Row(NAME, f"response->instance evicted p50 ({n} instances, RF 3)", r40["p50"], "ms",
            "brokers produce->consume p50", ref["p50"]),
        Row(NAME, "response->instance evicted p99", r40["p99"], "ms", "brokers produce->consume p99", ref["p99"],
            "p99 < 100 ms"),
        Row(NAME, "response->instance evicted max", r40["max"], "ms", "brokers produce->consume max", ref["max"]),
        Row(NAME, f"(revocation, instance) pairs missing of {fan40.pairs}", float(fan40.missing), "", goal="0"),
    ]
    q40, a40 = summary_ms(fan40.from_request), summary_ms(fan40.answered)
    rows += [
        Row(NAME, "request sent->instance evicted p50 (two argon2 operations included)", q40["p50"], "ms",
            "request sent->response p50", a40["p50"]),
        Row(NAME, "request sent->instance evicted p99", q40["p99"], "ms", "request sent->response p99", a40["p99"]),
    ]
    kits = [HolderKit(holder_id=f"k{i // 2:03d}", instance=f"k{i // 2:03d}-{i % 2 + 1}",
                      introspect_url=stack.url("devicesession") + "/oauth/introspect",
                      holder_secret=holder_secret(stack.env["HOLDER_SECRET"], f"k{i // 2:03d}"),
                      bootstrap=stack.kafka_bootstrap, topic_prefix=stack.topic_prefix)
            for i in range(EXTRA_KITS)]
    await asyncio.gather(*(k.start() for k in kits))
    try:
        await asyncio.wait_for(asyncio.gather(*(k.assigned.wait() for k in kits)), 120)
        more = expected | {(k.holder_id, k.instance_id) for k in kits}
        fan200 = await single.change_and_wait(stack, plain, second, more)
    finally:
        await asyncio.gather(*(k.stop() for k in kits), return_exceptions=True)
    r200 = summary_ms(fan200.from_response)
    rows += [
        Row(NAME, f"response->instance evicted p50 ({len(more)} instances)", r200["p50"], "ms",
            f"with {n} instances", r40["p50"]),
        Row(NAME, f"response->instance evicted p99 ({len(more)} instances)", r200["p99"], "ms",
            f"with {n} instances", r40["p99"], "p99 < 250 ms"),
        Row(NAME, f"(revocation, instance) pairs missing of {fan200.pairs}", float(fan200.missing), "", goal="0"),
    ]
    q200, a200 = summary_ms(fan200.from_request), summary_ms(fan200.answered)
    rows += [
        # The answer waits only for Hearth's own holders; the 160 kits of the bench process read each
        # revocation one after another, so the later the answer, the smaller "response->evicted".
        Row(NAME, f"request sent->instance evicted p99 ({len(more)} instances)", q200["p99"], "ms",
            "request sent->response p99", a200["p99"]),
        Row(NAME, f"request sent->response p50 ({len(more)} instances)", a200["p50"], "ms",
            f"with {n} instances", a40["p50"]),
    ]
    from bench import signin

    for row in await signin.run(stack):
        rows.append(Row(NAME, f"2 auth replicas: {row.metric}", row.value, row.unit, row.reference,
                        row.reference_value, row.goal))
    return rows
