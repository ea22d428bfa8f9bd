"""deploy/compose.yaml, deploy/k8s/hearth.yaml and the launcher's cluster topology describe the same
Hearth: the same services and sample holders with two replicas each, topics at replication factor 3
with min.insync.replicas=2 created before the services start, readiness on /readyz, an instance id
per replica, and (compose) three KRaft brokers and an edge that balances over every replica."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import compose_env
from deploy.launcher import SERVICES, Stack
from shared.passwords import usable_cpus
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
K8S = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "hearth.yaml").read_text()) if d]
CONFIG = next(d["data"] for d in K8S if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "hearth-config")
DEPLOYMENTS = {d["metadata"]["name"]: d for d in K8S if d["kind"] == "Deployment"}
HOLDER_NAMES = set(compose_env.HOLDERS)


def role(command: list[str]) -> str:
    """What a container or pod runs: ``auth`` for ``python -m services.auth``, ``holder-basement``
    for ``hearth holder --name basement``."""
    if command[:2] == ["hearth", "holder"]:
        return f"holder-{command[command.index('--name') + 1]}"
    if command[:3] == ["python", "-m", "shared.kafka"]:
        return "topics"
    return command[2].removeprefix("services.") if command[:2] == ["python", "-m"] else command[0]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


COMPOSE_ROLES = Counter(role(c["command"]) for c in COMPOSE.values() if "command" in c)
APPS = {*SERVICES, *(f"holder-{h}" for h in HOLDER_NAMES)}  # the five services and the sample holders


def test_compose_and_k8s_run_the_same_services_and_holders_with_two_replicas_each() -> None:
    k8s = {role(d["spec"]["template"]["spec"]["containers"][0]["command"]): d["spec"]["replicas"]
           for d in DEPLOYMENTS.values()}
    assert k8s == dict.fromkeys(APPS, 2)
    assert {r: COMPOSE_ROLES[r] for r in APPS} == dict.fromkeys(APPS, 2)


def test_the_launchers_cluster_topology_has_the_same_numbers(tmp_path: Path) -> None:
    stack = Stack(tmp_path, console=False, fixed_ports=True, holders=compose_env.HOLDERS, topology="cluster")
    assert (stack.replicas, stack.holder_instances, stack.brokers) == (2, 2, 3) == (
        compose_env.REPLICAS, compose_env.HOLDER_INSTANCES, compose_env.BROKERS)


def test_compose_has_three_kraft_brokers_with_one_cluster_id_each_on_its_own_volume() -> None:
    brokers = {n: c for n, c in COMPOSE.items() if c["image"].startswith("${KAFKA_IMAGE")}
    assert sorted(brokers) == ["kafka-1", "kafka-2", "kafka-3"]
    env = [c["environment"] for c in brokers.values()]
    assert sorted(e["KAFKA_NODE_ID"] for e in env) == ["1", "2", "3"]
    assert len({e["KAFKA_PORT"] for e in env}) == len({e["KAFKA_CONTROLLER_PORT"] for e in env}) == 3
    for e in env:
        voters = dict(v.split("@") for v in e["KAFKA_VOTERS"].split(","))
        assert sorted(voters) == ["1", "2", "3"] and voters[e["KAFKA_NODE_ID"]].endswith(e["KAFKA_CONTROLLER_PORT"])
        assert (e["KAFKA_REPLICATION"], e["KAFKA_MIN_ISR"], e["KAFKA_CLUSTER_ID"]) == ("3", "2", "${KAFKA_CLUSTER_ID}")
    assert len({c["volumes"][0] for c in brokers.values()}) == 3
    assert all("healthcheck" in c for c in brokers.values())


def test_topics_are_created_once_at_rf_3_min_isr_2_before_any_service_starts() -> None:
    job = next(d for d in K8S if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
    topics = COMPOSE["topics"]
    for command in (job, topics["command"]):
        assert role(command) == "topics"
        assert (flag(command, "--replication-factor"), flag(command, "--min-insync-replicas")) == ("3", "2")
    assert topics["environment"]["TOPIC_PARTITIONS"] == CONFIG["TOPIC_PARTITIONS"]
    assert topics["restart"] == "no"
    assert {b: c["condition"] for b, c in topics["depends_on"].items()} == dict.fromkeys(
        ["kafka-1", "kafka-2", "kafka-3"], "service_healthy")
    # topics a service or holder creates itself get the same policy
    for env in [CONFIG, *(c["environment"] for c in COMPOSE.values() if role(c.get("command", ["-"])) in APPS)]:
        assert (env["TOPIC_REPLICATION_FACTOR"], env["TOPIC_MIN_INSYNC_REPLICAS"]) == ("3", "2")
    for name, c in COMPOSE.items():
        if role(c.get("command", ["-"])) in APPS:
            assert c["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name


def test_every_replica_is_ready_on_readyz_and_has_its_own_instance_id_and_port() -> None:
    for name, d in DEPLOYMENTS.items():
        container = d["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        instance = next(e for e in container["env"] if e["name"] == "INSTANCE_ID")
        assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
    replicas = {n: c for n, c in COMPOSE.items() if role(c.get("command", ["-"])) in APPS}
    for name, c in replicas.items():
        assert "/readyz" in " ".join(c["healthcheck"]["test"]), name
        assert c["environment"]["INSTANCE_ID"] == name
    assert len({c["environment"]["HTTP_PORT"] for c in replicas.values()}) == len(replicas)
    for name, c in replicas.items():  # a holder listens on --port, which its healthcheck reads as HTTP_PORT
        if c["command"][0] == "hearth":
            assert flag(c["command"], "--port") == c["environment"]["HTTP_PORT"], name


def test_every_k8s_deployment_has_a_pod_disruption_budget() -> None:
    budgets = {d["metadata"]["name"]: d["spec"] for d in K8S if d["kind"] == "PodDisruptionBudget"}
    for name, d in DEPLOYMENTS.items():
        assert budgets[name]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
        assert budgets[name]["minAvailable"] == 1


def test_the_compose_edge_balances_over_both_replicas_and_services_reach_each_other_through_it() -> None:
    edge = COMPOSE["edge"]["environment"]
    by_port = {c["environment"]["HTTP_PORT"]: role(c["command"])
               for c in COMPOSE.values() if role(c.get("command", ["-"])) in SERVICES}
    for service in SERVICES:
        listed = edge[f"{service.upper()}_REPLICAS"].split(",")
        ports = [re.fullmatch(r"http://127\.0\.0\.1:(\$\{\w+\})", u).group(1) for u in listed]  # type: ignore[union-attr]
        assert [by_port[p] for p in ports] == [service, service]
        assert edge[f"{service.upper()}_URL"] == f"http://127.0.0.1:${{{service.upper()}_LB_PORT}}"
    env: dict[str, Any] = COMPOSE["auth-1"]["environment"]
    assert len(env["KAFKA_BOOTSTRAP_SERVERS"].split(",")) == 3
    for name, c in COMPOSE.items():
        if role(c.get("command", ["-"])) in APPS:
            assert c["depends_on"]["edge"] == {"condition": "service_healthy"}, name


def test_compose_env_defines_every_variable_compose_yaml_uses() -> None:
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)\}", text))  # ${NAME:-default} has a default
    generated = {*compose_env.FIXED, "POSTGRES_PASSWORD", "KAFKA_CLUSTER_ID"}
    assert used - generated == set()


def test_the_compose_edge_renders_the_same_upstreams_and_balancers_as_the_launchers_cluster(tmp_path: Path) -> None:
    from deploy.edge import config

    fixed = {**{k: str(v) for k, v in compose_env.FIXED.items()}, "POSTGRES_PASSWORD": "pw"}
    env = {k: re.sub(r"\$\{(\w+)\}", lambda m: fixed[m.group(1)], str(v))
           for k, v in COMPOSE["edge"]["environment"].items()}
    config({**env, "EDGE_PREFIX": str(tmp_path / "edge")})
    stack = Stack(tmp_path / "run", console=False, fixed_ports=True, holders=compose_env.HOLDERS, topology="cluster")
    (tmp_path / "launcher").mkdir()
    stack._nginx_upstreams(tmp_path / "launcher")

    def includes(d: Path) -> dict[str, str]:
        return {f.name: f.read_text() for f in d.glob("*.conf") if f.name != "hearth.conf"}

    assert includes(tmp_path / "edge") == includes(tmp_path / "launcher")
    assert sorted(includes(tmp_path / "edge")) == ["internal-lb.conf", *(f"upstream-{s}.conf" for s in
                                                                         ("auth", "devicesession", "linkcode", "web"))]


def test_co_located_auth_replicas_split_the_cores_for_hashing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("ARGON2_CONCURRENCY", raising=False)
    share = str(max(1, usable_cpus() // compose_env.REPLICAS))
    stack = Stack(tmp_path, console=False, fixed_ports=True, topology="cluster")
    stack.env = {}
    assert stack.service_env("auth", 1, "auth#2")["ARGON2_CONCURRENCY"] == share
    assert "ARGON2_CONCURRENCY" not in stack.service_env("devicesession", 2)
    stack.env = {"ARGON2_CONCURRENCY": "3"}  # an operator's choice wins
    assert stack.service_env("auth", 1)["ARGON2_CONCURRENCY"] == "3"
    single = Stack(tmp_path, console=False, fixed_ports=True)
    single.env = {}
    assert "ARGON2_CONCURRENCY" not in single.service_env("auth", 1)  # 0 in auth: every usable CPU
    assert compose_env.write(tmp_path / "compose.env")["ARGON2_CONCURRENCY"] == share
    for name in ("auth-1", "auth-2"):
        assert COMPOSE[name]["environment"]["ARGON2_CONCURRENCY"] == "${ARGON2_CONCURRENCY:-0}"


def test_usable_cpus_is_within_the_affinity_mask() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_automatic_hashing_threads_follow_cpus_within_a_cap_and_the_memory_limit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from shared import passwords

    files: dict[str, str] = {}
    monkeypatch.setattr(passwords, "_cgroup_file", files.get)
    monkeypatch.setattr(passwords.os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert passwords.auto_concurrency(19 * 1024) == passwords.AUTO_CONCURRENCY_MAX  # 64 cores, no limits
    files["cpu.max"] = "150000 100000"  # limits.cpu: 1.5
    assert passwords.usable_cpus() == 2 and passwords.auto_concurrency(19 * 1024) == 2
    files["cpu.max"] = "max 100000"
    files["memory.max"] = str(256 * 1024 * 1024)  # a quarter of 256 MiB holds 3 hashes of 19 MiB
    assert passwords.auto_concurrency(19 * 1024) == 3
    files["memory.max"] = str(32 * 1024 * 1024)
    assert passwords.auto_concurrency(19 * 1024) == 1  # never 0
    files["memory.max"] = "max"
    assert passwords.auto_concurrency(19 * 1024) == passwords.AUTO_CONCURRENCY_MAX
