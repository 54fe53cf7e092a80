"""Deployment files are accepted by the tools that consume them, and keep their contracts.

Validators: ``docker-compose config`` (Debian's docker-compose; no Docker engine needed),
``kubernetes-validate --strict`` (PyPI, offline schemas), ``promtool check config|rules``
(Debian's prometheus). The Dockerfile has no offline validator, so it is parsed here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtest.harness import REPO_ROOT, require_binary

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ifa-latency.json"
START_COMMAND = ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000", "--model-dir"]


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=env
    )


def compose_environment(**variables: str) -> dict[str, str]:
    """This process's environment without IFA_API_TOKEN, plus ``variables``."""
    return {k: v for k, v in os.environ.items() if k != "IFA_API_TOKEN"} | variables


def k8s_documents() -> dict[str, dict[str, Any]]:
    """``kind/name`` -> manifest, for every document under deploy/k8s (alternatives included)."""
    documents = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            documents[f"{document['kind']}/{document['metadata']['name']}"] = document
    return documents


# -- Prometheus -------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_rules() -> None:
    promtool = require_binary("promtool", "prometheus")
    config = run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr  # rules.yml resolved
    rules = run(promtool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr


# -- Docker Compose and Grafana ---------------------------------------------------------------


def test_docker_compose_accepts_the_stack() -> None:
    compose = require_binary("docker-compose", "docker-compose")
    environment = compose_environment(IFA_API_TOKEN="compose-token")
    result = run(compose, "-f", str(COMPOSE), "config", env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"ranker", "redis", "prometheus", "grafana"} <= set(services)

    ranker = services["ranker"]
    assert ranker["command"][: len(START_COMMAND)] == START_COMMAND
    assert ranker["environment"]["IFA_STORE"] == "redis"
    assert ranker["environment"]["IFA_REDIS_URL"].startswith("redis://redis:")
    # One single-threaded worker per CPU, as measured in results/capacity.md.
    assert int(ranker["environment"]["IFA_WORKERS"]) == int(float(ranker["cpus"]))
    assert ranker["environment"]["IFA_TORCH_THREADS"] == "1"
    # The ranker binds 0.0.0.0, so it needs the token, which comes from the operator.
    assert ranker["environment"]["IFA_API_TOKEN"] == "compose-token"

    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    assert mounts["/var/lib/grafana/dashboards"] == str(DASHBOARD.parent)
    prometheus_mounts = {
        v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]
    }
    assert prometheus_mounts["/etc/prometheus"] == str(DEPLOY / "prometheus")


def test_docker_compose_refuses_to_start_without_a_token() -> None:
    compose = require_binary("docker-compose", "docker-compose")
    result = run(compose, "-f", str(COMPOSE), "config", env=compose_environment())
    assert result.returncode != 0
    assert "set IFA_API_TOKEN to a secret token" in result.stdout + result.stderr


def test_grafana_provisioning_matches_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    providers = yaml.safe_load((provisioning / "dashboards" / "ifa.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    (datasource,) = datasources["datasources"]
    assert datasource["url"] == "http://prometheus:9090"

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    uids = {t["datasource"]["uid"] for p in panels for t in p["targets"]}
    assert uids == {datasource["uid"]}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("latency", "requests/s", "error ratio", "stage", "cache hit", "candidates",
                  "events ingested", "in-flight", "item cache", "active model version",
                  "warm-up", "/explain"):  # fmt: skip
        assert topic in titles, f"no panel about {topic}"
    # Unknown candidates split by reason, each series a share of all candidates.
    (unknown,) = [p for p in panels if "unknown candidate" in p["title"].lower()]
    (target,) = unknown["targets"]
    assert "sum by (reason) (rate(ifa_unknown_items_total" in target["expr"]
    assert "ifa_candidates_total" in target["expr"] and target["legendFormat"] == "{{reason}}"


# -- Kubernetes -------------------------------------------------------------------------------


def test_kubernetes_validate_accepts_the_manifests() -> None:
    binary = Path(sys.executable).with_name("kubernetes-validate")
    assert binary.is_file(), "kubernetes-validate missing: pip install -e '.[dev]'"
    manifests = [p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"]
    result = run(str(binary), "--strict", *map(str, manifests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    top_level = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == top_level


def test_ranker_deployment_contract() -> None:
    documents = k8s_documents()
    deployment = documents["Deployment/ifa-ranker"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    # The README's start command; the worker count comes from IFA_WORKERS (below).
    assert container["command"][: len(START_COMMAND)] == START_COMMAND
    assert "--workers" not in container["command"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
    env = {e["name"]: e for e in container["env"]}
    assert env["IFA_TORCH_THREADS"]["value"] == "1"
    assert env["PROMETHEUS_MULTIPROC_DIR"]["value"].startswith("/tmp/")
    workers = env["IFA_WORKERS"]
    assert workers["valueFrom"]["resourceFieldRef"] == {
        "containerName": container["name"], "resource": "limits.cpu", "divisor": "1",
    }  # fmt: skip
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Bound to 0.0.0.0, the service needs its token: the Secret is required, not optional.
    token = env["IFA_API_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is False
    assert (token["name"], token["key"]) == ("ifa-ranker", "api-token")
    assert "allow-unauthenticated-writes" not in " ".join(container["command"])
    assert "IFA_ALLOW_UNAUTHENTICATED_WRITES" not in env

    config_map = documents[f"ConfigMap/{container['envFrom'][0]['configMapRef']['name']}"]
    assert config_map["data"]["IFA_STORE"] == "redis"
    from service.settings import Settings

    names = {n.removeprefix("IFA_").lower() for n in config_map["data"]}
    assert names <= set(Settings.model_fields), (
        f"not settings: {names - set(Settings.model_fields)}"
    )
    redis_host = re.match(r"redis://([^:/]+)", config_map["data"]["IFA_REDIS_URL"])
    assert redis_host and f"Service/{redis_host[1]}" in documents

    labels = pod["metadata"]["labels"]
    service = documents["Service/ifa-ranker"]
    assert service["spec"]["selector"].items() <= labels.items()
    hpa = documents["HorizontalPodAutoscaler/ifa-ranker"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_hpa_scales_on_the_metric_the_adapter_serves(tmp_path: Path) -> None:
    documents = k8s_documents()
    hpa = documents["HorizontalPodAutoscaler/ifa-ranker"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"

    adapter = yaml.safe_load(documents["ConfigMap/prometheus-adapter-ifa"]["data"]["config.yaml"])
    (rule,) = [r for r in adapter["rules"] if r["name"]["as"] == name]
    assert re.match(rf"^{name}\{{", rule["seriesQuery"])
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"}
    assert overrides["namespace"] == {"resource": "namespace"}
    # The query the adapter would run for two pods parses (promtool checks it as a rule).
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", name)
        .replace("<<.LabelMatchers>>", 'namespace="ifa",pod=~"ifa-ranker-a|ifa-ranker-b"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query and query.startswith("sum by (pod)")
    rules = tmp_path / "adapter-query.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "adapter:query", "expr": query}]}]}))  # fmt: skip
    checked = run(require_binary("promtool", "prometheus"), "check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # The target is set in the HPA alone; deploy/README.md derives it and must name it.
    assert f"averageValue: {target['averageValue']}" in (DEPLOY / "README.md").read_text()


def test_redis_cluster_manifests_form_the_cluster_the_service_expects() -> None:
    from service.settings import Settings

    documents = k8s_documents()
    statefulset = documents["StatefulSet/ifa-redis-cluster"]
    service = documents[f"Service/{statefulset['spec']['serviceName']}"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # nodes meet before ready
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    options = dict(zip(redis["args"][::2], redis["args"][1::2], strict=True))
    assert options["--cluster-enabled"] == "yes"
    assert options["--appendonly"] == "yes"
    assert options["--cluster-config-file"].startswith(redis["volumeMounts"][0]["mountPath"])

    job = documents["Job/ifa-redis-cluster-bootstrap"]
    (bootstrap,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: int(e["value"]) for e in bootstrap["env"]}
    assert env["NODES"] == statefulset["spec"]["replicas"]
    assert env["NODES"] // (1 + env["REPLICAS_PER_MASTER"]) >= 3  # masters
    script = bootstrap["command"][-1]
    name, governing = statefulset["metadata"]["name"], service["metadata"]["name"]
    assert f"{name}-$i.{governing}" in script
    assert "--cluster create" in script and '--cluster-replicas "$REPLICAS_PER_MASTER"' in script

    # The ranker is pointed at it with settings that exist.
    readme = (DEPLOY / "README.md").read_text()
    assert "redis_cluster" in Settings.model_fields
    assert '"IFA_REDIS_CLUSTER": "true"' in readme and f"redis://{governing}:6379" in readme


def test_every_redis_evicts_users_keys_and_stays_under_its_memory_limit() -> None:
    """Compose, the single node and the cluster: volatile-lru (every key of a user has a TTL,
    the item table none) and a maxmemory under the container's limit, so a full Redis evicts
    the coldest users or refuses a write (a 503), and is never killed for its memory."""
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["command"]
    documents = k8s_documents()
    manifests = [
        documents[f"StatefulSet/{name}"]["spec"]["template"]["spec"]["containers"][0]
        for name in ("ifa-redis", "ifa-redis-cluster")
    ]
    for args, limit in [(compose[1:], None)] + [
        (c["args"], c["resources"]["limits"]["memory"]) for c in manifests
    ]:
        options = dict(zip(args[::2], args[1::2], strict=True))
        assert options["--maxmemory-policy"] == "volatile-lru"
        assert options["--maxmemory"] == "1536mb"
        if limit is not None:
            assert limit == "2Gi"  # 1.5 GiB for data, the rest for forks and client buffers


def test_model_artefact_delivery_is_documented_both_ways() -> None:
    documents = k8s_documents()
    assert "PersistentVolumeClaim/ifa-model" in documents  # mounted from a volume
    init = documents["Deployment/ifa-ranker"]["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["image"].startswith("ifa-ranking-model:")  # copied from an artefact image
    readme = (DEPLOY / "README.md").read_text()
    for approach in ("initContainer", "PersistentVolumeClaim", "--target baked"):
        assert approach in readme


# -- Dockerfile -------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = arguments.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 else None))
        else:
            stages[-1].instructions.append((instruction, arguments.strip()))
    return stages


def final_chain(stages: list[Stage]) -> list[tuple[str, str]]:
    """Instructions that build the default (last) stage, through the stages it derives from."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stages[-1]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return [i for stage in chain for i in stage.instructions]


@pytest.fixture(scope="module")
def image() -> list[tuple[str, str]]:
    return final_chain(parse_dockerfile(REPO_ROOT / "Dockerfile"))


def test_dockerfile_installs_dependencies_before_copying_code(
    image: list[tuple[str, str]],
) -> None:
    def first(predicate: Any) -> int:
        return next(i for i, (ins, args) in enumerate(image) if predicate(ins, args))

    copy_pyproject = first(lambda ins, args: ins == "COPY" and args.startswith("pyproject.toml"))
    install = first(lambda ins, args: ins == "RUN" and "pip install -r" in args)
    copy_code = first(lambda ins, args: ins == "COPY" and re.match(r"(model|service|\.)\b", args))
    assert copy_pyproject < install < copy_code

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in dependencies["dependencies"] if d.startswith("torch"))
    cpu_torch = first(lambda ins, args: ins == "RUN" and "download.pytorch.org/whl/cpu" in args)
    assert torch_pin in image[cpu_torch][1] and cpu_torch < install


def test_dockerfile_runs_as_non_root_with_a_healthcheck(image: list[tuple[str, str]]) -> None:
    users = [args for ins, args in image if ins == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}

    (healthcheck,) = [args for ins, args in image if ins == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and " CMD " in f" {healthcheck}"

    (command,) = [args for ins, args in image if ins == "CMD"]
    assert json.loads(command) == [*START_COMMAND, "artifacts"]


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule for one path: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = re.escape(pattern.removeprefix("!").strip("/"))
        regex = regex.replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "model/nets/ifa.py", "service/app.py"):
        assert not dockerignored(patterns, needed), needed
    unwanted = [
        ".venv/bin/python",
        ".git/HEAD",
        "data/worlds/small-0/events.parquet",
        "artifacts/LATEST",
        "tests/test_deploy.py",
        "model/__pycache__/x.pyc",
    ]
    for path in unwanted:
        assert dockerignored(patterns, path), path
