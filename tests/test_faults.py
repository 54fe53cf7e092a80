"""Redis killed and restarted, then paused, under Locust traffic, with real processes only.

A service (``python -m service``) on a private ``redis-server`` with AOF on (appendfsync everysec)
takes /rank and /events (unique event ids) from Locust, which records every request. During the
run the test SIGKILLs Redis, waits, restarts it on the same port and data directory, and later
pauses it (SIGSTOP) and resumes it (SIGCONT). Then, from the records and from Redis itself:

* every event id the service acknowledged with a 2xx is in Redis (zero lost);
* while Redis was down, /rank answered 2xx ``state_cache: "degraded"`` (no /rank 5xx at all), and
  /events answered 503, never 2xx;
* the service recovered without a restart (same process; 2xx /events and non-degraded ranks
  after);
* the /rank p99 while Redis was down, and every request while it was paused, stayed within the
  request budget.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from loadtest.harness import redis_process, running_service
from loadtest.runner import LoadOptions, run_locust
from loadtest.traffic import TrafficConfig
from service.stores.base import HistoryLimits
from service.stores.idempotency import event_digest
from tests.support import remembered_digests

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.redis]

BUDGET_SECONDS = 1.0
"""The service's request budget here (the shipped default is 0.5 s); the state gets 30 % of it
before /rank degrades. Roomier than the default because the judge is the client's clock, on a
shared CI machine."""
LOCUST_SECONDS = 32
EDGE_SECONDS = 0.3
"""Requests that started this close to a kill, pause or restart are not judged by phase: one
that started just before a kill may legitimately have been written and acknowledged."""


@dataclass(frozen=True)
class Request:
    route: str
    start: float
    end: float
    status: int
    state_cache: str | None
    acked: list[tuple[int, str]]

    @property
    def seconds(self) -> float:
        return self.end - self.start


def read_records(directory: Path) -> list[Request]:
    requests = []
    for path in directory.glob("requests-*.jsonl"):
        for line in path.read_text().splitlines():
            raw: dict[str, Any] = json.loads(line)
            requests.append(
                Request(
                    raw["route"],
                    raw["start"],
                    raw["end"],
                    raw["status"],
                    raw.get("state_cache"),
                    [(int(u), str(e)) for u, e in raw.get("acked", [])],
                )
            )
    return requests


def during(requests: list[Request], route: str, since: float, until: float) -> list[Request]:
    """Requests of ``route`` that started and ended inside [since + edge, until - edge]."""
    return [
        r
        for r in requests
        if r.route == route and r.start >= since + EDGE_SECONDS and r.end <= until - EDGE_SECONDS
    ]


def wait_for_traffic(directory: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_records(directory)) >= 20:
            return
        time.sleep(0.2)
    raise TimeoutError("Locust sent no traffic")


def test_redis_killed_restarted_and_paused_under_load(
    tmp_path: Path, artifact_dir: Path, live_world: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    prefix = f"ifa-faults-{uuid.uuid4().hex[:8]}"
    with redis_process(tmp_path / "redis-data", aof=True, appendfsync="everysec") as server:
        env = {
            "IFA_STORE": "redis",
            "IFA_REDIS_URL": server.url,
            "IFA_REDIS_PREFIX": prefix,
            "IFA_REQUEST_BUDGET_SECONDS": str(BUDGET_SECONDS),
            "IFA_STATE_FETCH_SHARE": "0.3",
        }
        with running_service(artifact_dir, tmp_path / "service.log", env=env) as service:
            options = LoadOptions(
                host=service.url,
                users=6,
                spawn_rate=6,
                run_time_s=LOCUST_SECONDS,
                csv_prefix=tmp_path / "locust" / "run",
                traffic=TrafficConfig(
                    world=live_world,
                    candidates=100,
                    k=10,
                    rank_weight=2,
                    events_weight=1,
                    events_per_post=5,
                    user_rps=4.0,
                ),
                record_dir=records,
            )
            locust = threading.Thread(target=run_locust, args=(options,))
            locust.start()
            wait_for_traffic(records)
            time.sleep(4)

            killed = time.time()
            server.kill()
            time.sleep(5)
            restarting = time.time()
            server.start()  # same port and directory: Redis replays its AOF
            restarted = time.time()
            time.sleep(5)

            paused = time.time()
            server.pause()
            time.sleep(3)
            server.resume()
            resumed = time.time()

            locust.join(LOCUST_SECONDS + 90)
            assert not locust.is_alive(), "Locust did not finish"
            assert service.process.poll() is None, "the service exited"
            finished = time.time()

        requests = read_records(records)
        client = redis.Redis.from_url(server.url)
        try:
            acked: dict[int, set[str]] = defaultdict(set)
            for r in requests:
                for user_id, event_id in r.acked:
                    acked[user_id].add(event_id)
            remembered = {user_id: remembered_digests(client, prefix, user_id) for user_id in acked}
            lost = [
                (user_id, event_id)
                for user_id, ids in acked.items()
                for event_id in ids
                if event_digest(event_id) not in remembered[user_id]
            ]
            stored_ids = sum(len(digests) for digests in remembered.values())
            stored_records = sum(
                int(client.strlen(f"{prefix}:{{u:{user_id}}}:log")) // 20 for user_id in acked
            )
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
        finally:
            client.close()

    n_acked = sum(len(ids) for ids in acked.values())
    assert n_acked > 100, f"only {n_acked} events acknowledged: the run did not load the service"
    busiest = max(len(ids) for ids in acked.values())
    assert busiest <= HistoryLimits().dedup_window, "a user's digests lapped the window"
    # Zero lost: every acknowledged id's digest is in Redis after the kill and the AOF replay,
    # and each stored digest has its log record (one is remembered iff its record was appended).
    # No user posts more than the dedup window or the log's keep here, so none was pushed out.
    assert lost == [], f"{len(lost)} of {n_acked} acknowledged events lost: {lost[:5]}"
    assert stored_records == stored_ids >= n_acked

    ranks = [r for r in requests if r.route == "/rank"]
    assert [r for r in ranks if r.status >= 500] == [], "a /rank answered 5xx"

    down = during(requests, "/rank", killed, restarting)
    assert len(down) >= 10, f"only {len(down)} ranks while Redis was down"
    assert all(r.status == 200 and r.state_cache == "degraded" for r in down)
    p99_down = float(np.percentile([r.seconds for r in down], 99))
    assert p99_down <= BUDGET_SECONDS, f"/rank p99 {p99_down:.3f} s while Redis was down"

    events_down = during(requests, "/events", killed, restarting)
    assert events_down, "no /events while Redis was down"
    assert {r.status for r in events_down} == {503}, "an /events was acknowledged without Redis"

    # Recovered, without restarting the service: acknowledged events and real states again.
    after = [r for r in requests if r.start > restarted + 1 and r.end < paused]
    assert any(r.route == "/events" and r.status == 200 for r in after)
    assert any(r.route == "/rank" and r.state_cache in ("hit", "stale", "miss") for r in after)
    later = [r for r in requests if r.start > resumed + 1]
    assert any(r.route == "/events" and r.status == 200 for r in later)
    assert any(r.route == "/rank" and r.state_cache in ("hit", "stale", "miss") for r in later)

    # Paused (a slow Redis): every request still finished within the budget, answered degraded
    # (/rank) or 503 (/events).
    slow = [r for r in requests if paused + EDGE_SECONDS <= r.start <= resumed - BUDGET_SECONDS]
    assert len(slow) >= 5, f"only {len(slow)} requests while Redis was paused"
    worst = max(r.seconds for r in slow)
    assert worst <= BUDGET_SECONDS + 0.25, f"a request took {worst:.3f} s while Redis was paused"
    assert all(
        (r.route == "/rank" and r.state_cache == "degraded") or r.status == 503 for r in slow
    )
    assert finished > resumed
    print(
        f"acknowledged {n_acked} events, lost 0; while down: {len(down)} ranks degraded "
        f"(p99 {p99_down * 1000:.0f} ms), {len(events_down)} /events 503; while paused: "
        f"{len(slow)} requests, slowest {worst * 1000:.0f} ms (budget {BUDGET_SECONDS * 1000:.0f})"
    )
