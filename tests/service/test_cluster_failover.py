"""A Redis Cluster master dies mid-run and comes back from its append-only file.

A real ``python -m service`` on a three-master cluster (AOF, an fsync per write) serves a steady
mix of /events batches (each spanning several users, so several slots) and /rank calls. One
master is killed with SIGKILL, left down for a few seconds, and restarted from its directory.
Afterwards, every event the service acknowledged (200) must be in its user's log; a batch that
was refused (503) is retried, as a client would, and every event must then be in the log exactly
once. /rank must keep answering 200 throughout (degraded where its user's slot has no master).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from loadtest.harness import LiveService, LocalCluster, redis_cluster, running_service
from service.stores.redis import RedisStore
from tests.support import T0

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

USERS = list(range(1000, 1024))
PREFIX = "ifa-failover"
VICTIM = 1
"""The killed master: not the node the service's URL names."""


@pytest.fixture
def durable_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with redis_cluster(tmp_path / "cluster", durable=True) as cluster:
        yield cluster


@pytest.fixture
def service(
    durable_cluster: LocalCluster, artifact_dir: Path, tmp_path: Path
) -> Iterator[LiveService]:
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_CLUSTER": "true",
        "IFA_REDIS_URL": durable_cluster.url,
        "IFA_REDIS_PREFIX": PREFIX,
        # An fsync per write on a shared CI machine: long timeouts, and a budget they fit in.
        "IFA_REDIS_TIMEOUT_SECONDS": "0.5",
        "IFA_REQUEST_BUDGET_SECONDS": "3.0",
    }
    with running_service(artifact_dir, tmp_path / "service.log", env=env) as live:
        yield live


@dataclass
class Traffic:
    """What the service answered while the master was down, and before and after."""

    acknowledged: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    rank_statuses: Counter[int] = field(default_factory=Counter)
    events_statuses: Counter[int] = field(default_factory=Counter)
    serial: int = 0

    def batch(self, rng: np.random.Generator) -> dict[str, Any]:
        """Four events of four users (so several slots); timestamps identify events."""
        events = []
        for user in rng.choice(USERS, 4, replace=False):
            self.serial += 1
            events.append({
                "event_id": f"e{self.serial}",
                "user_id": int(user),
                "item_id": int(rng.integers(0, 1000)),
                "action": "click",
                "timestamp": T0 + self.serial,
            })  # fmt: skip
        return {"events": events}


async def drive(client: httpx.AsyncClient, traffic: Traffic, until: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while time.monotonic() < until:
        payload = traffic.batch(rng)
        posted = await client.post("/events", json=payload)
        traffic.events_statuses[posted.status_code] += 1
        (traffic.acknowledged if posted.status_code == 200 else traffic.refused).append(payload)
        user = int(rng.choice(USERS))
        ranked = await client.post("/rank", json={"user_id": user, "candidate_ids": [1, 2, 3]})
        traffic.rank_statuses[ranked.status_code] += 1


async def logged_timestamps(cluster: LocalCluster) -> dict[int, list[float]]:
    store = RedisStore(cluster.url, prefix=PREFIX, cluster=True)
    try:
        return {u: (await store.read_events(u, 0)).timestamps.tolist() for u in USERS}
    finally:
        await store.close()


def timestamps_by_user(payloads: list[dict[str, Any]]) -> dict[int, set[float]]:
    by_user: dict[int, set[float]] = {u: set() for u in USERS}
    for payload in payloads:
        for e in payload["events"]:
            by_user[e["user_id"]].add(e["timestamp"])
    return by_user


async def test_a_killed_master_loses_no_acknowledged_event_and_rank_keeps_answering(
    durable_cluster: LocalCluster, service: LiveService
) -> None:
    traffic = Traffic()
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        workers = 3

        async def phase(seconds: float, seed: int) -> None:
            until = time.monotonic() + seconds
            await asyncio.gather(*(drive(client, traffic, until, seed + w) for w in range(workers)))

        await phase(1.5, 0)
        durable_cluster.kill(VICTIM)
        await phase(4.0, 10)
        down = Counter(traffic.events_statuses)
        await asyncio.to_thread(durable_cluster.restart, VICTIM)
        await phase(1.5, 20)

        # The outage was real: some batches were refused, and never with a bare 500.
        assert down[503] > 0, f"no batch was refused while a master was down: {down}"
        assert set(traffic.events_statuses) <= {200, 503}, traffic.events_statuses

        # 1. Everything acknowledged survived the kill (AOF, fsync per write).
        logged = await logged_timestamps(durable_cluster)
        for user, stamps in timestamps_by_user(traffic.acknowledged).items():
            missing = stamps - set(logged[user])
            assert not missing, f"user {user} lost {len(missing)} acknowledged events"

        # 2. Refused batches retried (some of their events were written before the kill):
        # afterwards every event is logged exactly once.
        for payload in traffic.refused:
            for _ in range(5):  # as a client would on 503 + Retry-After
                retried = await client.post("/events", json=payload)
                if retried.status_code != 503:
                    break
                await asyncio.sleep(0.5)
            assert retried.status_code == 200, retried.text
        logged = await logged_timestamps(durable_cluster)
        posted = timestamps_by_user(traffic.acknowledged + traffic.refused)
        for user in USERS:
            assert sorted(logged[user]) == sorted(posted[user]), f"user {user}"

    # 3. /rank answered every call, degraded where its user's slot had no master.
    assert set(traffic.rank_statuses) == {200}, traffic.rank_statuses
