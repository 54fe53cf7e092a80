"""End to end: a real uvicorn process on the Redis store, called over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.harness import running_service
from tests.support import events_payload

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def server(artifact_dir: Path, redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[str]:
    # Settings from the environment and the command line together.
    with running_service(
        artifact_dir,
        tmp_path / "service.log",
        env={"IFA_STORE": "redis"},
        timeout=60,
        args=["--redis-url", redis_url, "--redis-prefix", redis_prefix, "--log-level", "warning"],
    ) as service:
        yield service.url


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
