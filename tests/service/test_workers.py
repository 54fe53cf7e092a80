"""``python -m service --workers N``: uvicorn's worker processes on one port, one /metrics view.

Real processes throughout: the service on the Redis store with two workers, scraped over HTTP;
each worker's own samples are read back from prometheus-client's multiprocess files to prove that
both served and that a scrape through either one sums them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from loadtest.harness import REPO_ROOT, running_service, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

RANKS = 60


def rank_requests_total(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ifa_http_requests_total" and s.labels.get("route") == "/rank"
    )


def per_worker_rank_requests(directory: Path, tmp_path: Path) -> dict[int, float]:
    """/rank requests counted by each worker process, from its own multiprocess file."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        alone = tmp_path / f"worker-{pid}"
        alone.mkdir()
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        counts[pid] = sum(
            s.value
            for metric in registry.collect()
            for s in metric.samples
            if s.name == "ifa_http_requests_total" and s.labels.get("route") == "/rank"
        )
    return counts


def test_two_workers_serve_one_port_and_one_scrape_sums_them(
    artifact_dir: Path, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale")  # an earlier run's file is removed
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_URL": redis_url,
        "IFA_REDIS_PREFIX": redis_prefix,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    log = tmp_path / "service.log"
    with running_service(
        artifact_dir, log, env=env, timeout=120, args=["--workers", "2"]
    ) as service:
        # Ready means one worker answers; on a loaded machine the other may still be loading
        # its model, and would then take no connection.
        wait_until(
            lambda: log.read_text().count("Application startup complete") >= 2,
            120,
            "both workers started",
            log=log,
        )
        body = {"user_id": 5, "candidate_ids": list(range(100)), "k": 3}

        def rank(_: int) -> int:
            # A new connection per request, several at once: the kernel hands the
            # connections to whichever worker accepts first, so both take some.
            return httpx.post(f"{service.url}/rank", json=body, timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(rank, range(RANKS)))
        assert statuses == [200] * RANKS
        scrapes = [httpx.get(f"{service.url}/metrics", timeout=10).text for _ in range(6)]

    per_worker = per_worker_rank_requests(metrics_dir, tmp_path)
    assert len(per_worker) == 2, f"expected two worker processes, found {sorted(per_worker)}"
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert sum(per_worker.values()) == RANKS
    # Whichever worker answered the scrape, it reported both workers' requests.
    assert [rank_requests_total(text) for text in scrapes] == [RANKS] * len(scrapes)


def test_the_memory_store_refuses_several_workers(artifact_dir: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "service", "--model-dir", str(artifact_dir), "--workers", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "IFA_STORE": "memory"},
        check=False,
    )
    assert completed.returncode == 2
    assert "memory store" in completed.stderr and "--store redis" in completed.stderr
    assert "Traceback" not in completed.stderr
