"""Every PromQL expression we ship returns data from a real Prometheus scraping the real service.

A Prometheus server (Debian's ``prometheus``) scrapes ``python -m service`` every second and
evaluates deploy/prometheus/rules.yml every second, while a short Locust run and a few direct
requests exercise every stage (a cold miss encodes, posted events fold, a bad request is a 4xx).
Then each query of the Grafana dashboard, each recording rule and each alert's expression (its
left-hand side, without the threshold) goes through /api/v1/query and must return a sample. A
panel whose query returns nothing, typically a misspelt metric or label, fails the test.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtest.harness import (
    REPO_ROOT,
    LiveService,
    free_port,
    http_ok,
    post_json,
    require_binary,
    stop,
    wait_until,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.e2e, pytest.mark.redis]

DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ifa-latency.json"
JOB = "ifa-ranking"

# Grafana's built-in interval variables, as Grafana would expand them over a short range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

# `<expression> <comparison> <number>`: how rules.yml writes every alert.
ALERT_FORM = re.compile(r"^(?P<expression>.*\S)\s*(?:==|!=|>=|<=|>|<)\s*[-+]?[\d.]+(?:e[-+]?\d+)?$")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expression) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expression = expression.replace(variable, value)
            assert "$" not in expression, f"unexpanded variable in {panel['title']}: {expression}"
            queries.append((f"panel {panel['title']!r} {target['refId']}", expression))
    return queries


def rule_queries() -> list[tuple[str, str]]:
    """(rule name, expression) of every recording rule and of every alert's left-hand side."""
    queries = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                queries.append((f"record {rule['record']}", rule["expr"]))
            else:
                form = ALERT_FORM.match(rule["expr"].strip())
                assert form, f"alert {rule['alert']} is not `<expression> <op> <number>`"
                queries.append((f"alert {rule['alert']}", form["expression"]))
    return queries


def query(base_url: str, expression: str) -> list[dict[str, Any]]:
    url = f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:  # 400 for a query that does not parse
        raise AssertionError(f"{expression}: {error.read().decode()}") from error
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample with a number (a quantile over an idle window is NaN)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.fixture(scope="module")
def prometheus(
    live_service: LiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Prometheus with the shipped config, pointed at the live service, at 1 s intervals."""
    binary = require_binary("prometheus", "prometheus")
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert jobs, f"{PROMETHEUS_CONFIG} has no {JOB!r} job (IFARankerDown relies on the name)"
    target = live_service.url.removeprefix("http://")
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"] = [jobs[0] | {"static_configs": [{"targets": [target]}]}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    log = directory / "prometheus.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [binary, f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/-/ready"), 30, "prometheus", process, log)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def traffic(
    prometheus: str,
    live_service: LiveService,
    live_world: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """Prometheus' URL, after a short Locust run and requests that reach every stage and outcome."""
    url = live_service.url
    # A cold user (never ranked) misses and encodes its history; then events make it stale.
    post_json(f"{url}/rank", {"user_id": 10_000_001, "candidate_ids": [1, 2, 3], "k": 2})
    events = [
        {"event_id": f"prom-{i}", "user_id": 10_000_001, "item_id": i, "action": "click",
         "timestamp": time.time() - 10 + i}
        for i in range(3)
    ]  # fmt: skip
    post_json(f"{url}/events", {"events": events})
    post_json(f"{url}/events", {"events": events[:1]})  # a duplicate
    post_json(f"{url}/rank", {"user_id": 10_000_001, "candidate_ids": [1, 2, 3], "k": 2})
    post_json(f"{url}/explain", {"user_id": 10_000_001, "item_id": 2, "top": 3})
    try:
        post_json(f"{url}/rank", {"user_id": 1, "candidate_ids": [], "k": 1})
    except urllib.error.HTTPError as error:
        assert error.code == 422

    prefix = tmp_path_factory.mktemp("prometheus-load") / "load"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--host", url, "--users", "4", "--run-time", "12s",
         "--user-rps", "4", "--world", str(live_world), "--csv-prefix", str(prefix),
         "--max-p99-ms", "1000", "--max-failure-ratio", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return prometheus


def test_prometheus_scrapes_the_service_and_loads_every_rule(traffic: str) -> None:
    with urllib.request.urlopen(f"{traffic}/api/v1/targets", timeout=5) as response:
        targets = json.loads(response.read())["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets

    with urllib.request.urlopen(f"{traffic}/api/v1/rules", timeout=5) as response:
        groups = json.loads(response.read())["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    names = {name.split(" ", 1)[1] for name, _ in rule_queries()}
    assert set(loaded) == names
    unhealthy = {
        name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"
    }
    assert not unhealthy, unhealthy


@pytest.mark.parametrize(
    ("name", "expression"),
    [*dashboard_queries(), *rule_queries()],
    ids=lambda v: str(v)[:60],
)
def test_expression_returns_data(traffic: str, name: str, expression: str) -> None:
    # Rules and rates need a few evaluations after the traffic; allow a short settling time.
    deadline = time.monotonic() + 15
    while not has_data(result := query(traffic, expression)) and time.monotonic() < deadline:
        time.sleep(1)
    assert has_data(result), f"{name} returned no data: {expression}\n{result}"
