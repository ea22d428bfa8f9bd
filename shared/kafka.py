"""Kafka producer wrapper and topic set-up (aiokafka).

The producer is idempotent with ``acks=all``: a retried send cannot duplicate or reorder records
within a partition, which the outbox relay relies on for per-key order. With topics at replication
factor 3 and ``min.insync.replicas=2`` (the cluster topology, production), an acknowledged record
is on at least two brokers, so losing any one broker loses nothing acknowledged.

Topics created at start get ``TOPIC_REPLICATION_FACTOR`` replicas (default 1, single broker) and,
when ``TOPIC_MIN_INSYNC_REPLICAS`` is set, that topic-level ``min.insync.replicas``. The same
variables are read by every process that creates topics (services, holder kits, ``hearth`` commands).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from shared.events import Envelope

log = logging.getLogger(__name__)


def make_producer(bootstrap: str, *, client_id: str = "hearth") -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        # No linger: the relay hands a whole batch over before the sender runs, so it goes as one
        # request anyway, and a lone event (a revocation) should not wait for company.
        linger_ms=0,
        request_timeout_ms=10_000,
        retry_backoff_ms=200,
        max_batch_size=256 * 1024,
    )


async def start_producer(producer: AIOKafkaProducer, *, attempts: int = 60) -> None:
    """Start, retrying while the broker is not reachable yet (start order is not guaranteed)."""
    for i in range(attempts):
        try:
            await producer.start()
            return
        except KafkaError as exc:
            if i == attempts - 1:
                raise
            log.warning("kafka not reachable yet, retrying", extra={"error": str(exc)})
            await asyncio.sleep(min(0.2 * (i + 1), 2.0))


async def publish(producer: AIOKafkaProducer, topic: str, env: Envelope) -> None:
    """Send one envelope and wait for the broker's acknowledgement."""
    await producer.send_and_wait(topic, env.encode(), key=env.key.encode(), headers=env.headers())


def replication() -> tuple[int, dict[str, str]]:
    """(replication factor, topic configs) for topics created here, from the environment."""
    rf = int(os.environ.get("TOPIC_REPLICATION_FACTOR", "1") or 1)
    min_isr = os.environ.get("TOPIC_MIN_INSYNC_REPLICAS", "").strip()
    return rf, ({"min.insync.replicas": str(int(min_isr))} if min_isr else {})


async def ensure_topics(bootstrap: str, topics: Iterable[str], *, partitions: int = 4,
                        replication_factor: int | None = None, min_brokers: int = 0,
                        within: float = 60.0) -> dict[str, str]:
    """Create topics that do not exist yet. Idempotent; tolerates concurrent creators.

    Returns the topics the broker refused to create, with its reason (an already existing topic is
    not refused); callers that let the broker auto-create topics later may ignore them. With
    ``min_brokers``, waits up to ``within`` seconds until that many brokers have registered, so a
    topic-creation job started beside a new cluster does not ask for more replicas than exist."""
    rf, configs = replication()
    if replication_factor is not None:
        rf = replication_factor
    deadline = asyncio.get_running_loop().time() + within
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    for i in range(60):
        try:
            await admin.start()
            break
        except KafkaError:
            if i == 59:
                raise
            await asyncio.sleep(0.5)
    try:
        while len((await admin.describe_cluster())["brokers"]) < min_brokers:
            if asyncio.get_running_loop().time() > deadline:
                raise KafkaError(f"fewer than {min_brokers} brokers registered within {within:.0f}s")
            await asyncio.sleep(0.5)
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name=t, num_partitions=partitions, replication_factor=rf, topic_configs=dict(configs))
            for t in dict.fromkeys(topics)
            if t not in existing
        ]
        if not new:
            return {}
        try:
            response = await admin.create_topics(new)
        except TopicAlreadyExistsError:
            return {}
        # The answer carries one error code per topic; create_topics itself does not raise them.
        return {t[0]: f"{for_code(t[1]).__name__}: {t[2] if len(t) > 2 else ''}".rstrip(": ")
                for t in response.topic_errors if t[1] not in (0, TopicAlreadyExistsError.errno)}
    finally:
        await admin.close()


# Consumer groups of Hearth's services; each has a dead-letter topic ``<group>.dlq``.
SERVICE_GROUPS = ("devicesession.revoker", "devicesession.acks", "linkcode.revocations", "notification")


async def create_all(bootstrap: str, *, prefix: str = "", partitions: int = 12, replication_factor: int = 3,
                     min_insync: int = 2) -> list[str]:
    """Every topic Hearth uses, at a production replication policy (the Kubernetes topics Job and
    compose's ``topics`` container). Waits for ``replication_factor`` brokers; raises if the
    cluster refuses any topic, so the job fails instead of succeeding with topics missing."""
    from shared.events import ALL_TOPICS, dead_letter_topic

    os.environ["TOPIC_MIN_INSYNC_REPLICAS"] = str(min_insync)
    topics = [prefix + t for t in ALL_TOPICS] + [dead_letter_topic(prefix + g) for g in SERVICE_GROUPS]
    refused = await ensure_topics(bootstrap, topics, partitions=partitions, replication_factor=replication_factor,
                                  min_brokers=replication_factor)
    if refused:  # a job that exits 0 here lets services start on topics that do not exist
        raise KafkaError("topics not created: " + "; ".join(f"{t} ({why})" for t, why in refused.items()))
    return topics


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.kafka``: create every topic with a production replication policy."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m shared.kafka", description=main.__doc__)
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    p.add_argument("--prefix", default=os.environ.get("TOPIC_PREFIX", ""))
    p.add_argument("--partitions", type=int, default=int(os.environ.get("TOPIC_PARTITIONS", "12")))
    p.add_argument("--replication-factor", type=int, default=3)
    p.add_argument("--min-insync-replicas", type=int, default=2)
    a = p.parse_args(argv)
    topics = asyncio.run(create_all(a.bootstrap, prefix=a.prefix, partitions=a.partitions,
                                    replication_factor=a.replication_factor, min_insync=a.min_insync_replicas))
    print(f"{len(topics)} topics present: {', '.join(topics)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
