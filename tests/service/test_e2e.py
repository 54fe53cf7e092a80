"""End to end: a real uvicorn process on the Redis store, called over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.harness import free_port
from tests.support import events_payload

pytestmark = [pytest.mark.e2e, pytest.mark.redis]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(artifact_dir: Path, redis_url: str, redis_prefix: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IFA_")}
    env["IFA_STORE"] = "redis"  # settings from the environment and the command line together
    process = subprocess.Popen(
        [
            sys.executable, "-m", "service",
            "--port", str(port),
            "--model-dir", str(artifact_dir),
            "--redis-url", redis_url,
            "--redis-prefix", redis_prefix,
            "--log-level", "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"the service exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the service did not become ready within 60 s")
        time.sleep(0.2)
    try:
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_a_served_process_ranks_ingests_and_reports_metrics(server: str) -> None:
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=server, timeout=10) as client:
        info = client.get("/model").json()
        assert info["store"] == "redis"
        payload = events_payload(31, 12, rng)
        assert client.post("/events", json=payload).json() == {"accepted": 12, "duplicates": 0}
        assert client.post("/events", json=payload).json() == {"accepted": 0, "duplicates": 12}
        candidates = list(range(200, 260))
        first = client.post("/rank", json={"user_id": 31, "candidate_ids": candidates, "k": 5})
        assert first.status_code == 200
        assert (first.json()["state_cache"], first.json()["history_length"]) == ("miss", 12)
        second = client.post("/rank", json={"user_id": 31, "candidate_ids": candidates, "k": 5})
        assert second.json()["state_cache"] == "hit"
        assert second.json()["items"] == first.json()["items"]
        bad = client.post("/rank", json={"user_id": 31, "candidate_ids": [1, 1]})
        assert bad.status_code == 422
        metrics = client.get("/metrics")

    assert metrics.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.text)
        for s in family.samples
    }
    rank = (("method", "POST"), ("route", "/rank"))
    assert samples[("ifa_http_requests_total", (*rank, ("status_class", "2xx")))] == 2
    assert samples[("ifa_http_requests_total", (*rank, ("status_class", "4xx")))] == 1
    assert samples[("ifa_http_request_duration_seconds_count", rank)] == 3
    events = (("method", "POST"), ("route", "/events"))
    assert samples[("ifa_http_requests_total", (*events, ("status_class", "2xx")))] == 2
    assert samples[("ifa_events_ingested_total", (("outcome", "accepted"),))] == 12
    assert samples[("ifa_events_ingested_total", (("outcome", "duplicate"),))] == 12
    assert samples[("ifa_state_cache_total", (("outcome", "miss"),))] == 1
    assert samples[("ifa_state_cache_total", (("outcome", "hit"),))] == 1
    assert samples[("ifa_model_info", (("version", info["version"]),))] == 1
    assert (
        samples[("ifa_store_operation_duration_seconds_count", (("operation", "put_state"),))] == 1
    )
