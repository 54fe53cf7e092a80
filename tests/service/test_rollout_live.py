"""A rollout through the real service: ``python -m service --workers 2`` on Redis, traffic running.

Both worker processes follow LATEST on their own; every response is a 200 that names one of the
published versions; a fusion-only change is served from the cached states (no miss); an encoder
change ends with every worker on the new version and the old state namespace deleted; one scrape
reports the rollouts of both workers (multiprocess metrics).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from loadtest.harness import running_service, warm_state_cache
from model.artifact import load_manifest
from tests.support import T0, build_artifact, events_payload

pytestmark = [pytest.mark.e2e, pytest.mark.redis]
USERS = range(12)
TOKEN = "live-admin"
REQUEST_TIME = T0 + 30 * 86400.0


class Traffic:
    """/rank requests from a thread until stopped: (seconds since start, status, version, cache)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, int, str | None, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                user = int(rng.choice(list(USERS)))
                body = {
                    "user_id": user,
                    "candidate_ids": list(range(50)),
                    "k": 5,
                    "request_time": REQUEST_TIME,
                }
                response = client.post(f"{self.url}/rank", json=body)
                ok = response.status_code == 200
                answer = response.json() if ok else {}
                self.seen.append(
                    (
                        time.monotonic(),
                        response.status_code,
                        answer.get("model_version"),
                        answer.get("state_cache"),
                    )
                )

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_for_only(self, version: str, responses: int = 30, timeout: float = 120) -> float:
        """Wait until the last ``responses`` responses all name ``version``; returns when."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.seen[-responses:]
            if len(last) == responses and all(v == version for _, _, v, _ in last):
                return last[0][0]
            time.sleep(0.1)
        raise AssertionError(f"{version} is not the only version served: {self.seen[-10:]}")


def eventually(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_two_workers_roll_out_under_traffic(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    root = build_artifact(tmp_path / "models", time_decay=False)
    first = load_manifest(root)
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_URL": redis_url,
        "IFA_REDIS_PREFIX": redis_prefix,
        "IFA_API_TOKEN": TOKEN,
        "IFA_MODEL_POLL_SECONDS": "0.2",
        # Both workers follow within a poll (0.2 s) and a warm-up of 12 users.
        "IFA_ROLLOUT_CLEANUP_DELAY_SECONDS": "3",
        "IFA_REQUEST_BUDGET_SECONDS": "10",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    (tmp_path / "metrics").mkdir()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_service(
        root, tmp_path / "service.log", env=env, timeout=120, args=["--workers", "2"]
    ) as service:
        rng = np.random.default_rng(1)
        for user in USERS:
            events = events_payload(user, 25, rng)
            assert httpx.post(f"{service.url}/events", json=events, headers=auth).status_code == 200
        warm_state_cache(service.url, USERS, range(50))
        with Traffic(service.url) as traffic:
            traffic.wait_for_only(first.version)
            build_artifact(root, time_decay=False, fusion={"click": 1.0, "like": 1.0})
            second = load_manifest(root)
            switched = traffic.wait_for_only(second.version)
            after_fusion = [s for s in traffic.seen if s[0] >= switched]
            build_artifact(root, time_decay=False, seed=5)
            third = load_manifest(root)
            traffic.wait_for_only(third.version)
        scrape = httpx.get(f"{service.url}/metrics", timeout=10).text
        # The cleanup runs in the service, rollout_cleanup_delay_seconds after the switch.
        client = redis.Redis.from_url(redis_url)
        try:

            def old_states_gone() -> bool:
                pattern = f"{redis_prefix}:*:state:{first.state_version}"
                return not list(client.scan_iter(match=pattern, count=1000))

            eventually(old_states_gone)
            pattern = f"{redis_prefix}:*:state:{third.state_version}"
            new_states = list(client.scan_iter(match=pattern))
        finally:
            client.close()

    assert {status for _, status, _, _ in traffic.seen} == {200}
    versions = {version for _, _, version, _ in traffic.seen}
    assert versions == {first.version, second.version, third.version}
    # The fusion change kept the states: every user was cached before it, none missed after.
    assert "miss" not in {cache for *_, cache in after_fusion}
    assert second.state_version == first.state_version != third.state_version

    switches = sum(
        sample.value
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if sample.name == "ifa_rollouts_total" and sample.labels["outcome"] == "switched"
    )
    assert switches == 4  # two rollouts on each of the two workers
    assert len(new_states) == len(USERS)
