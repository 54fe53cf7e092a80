"""Two replicas of the service on one Redis Cluster agree with one process run serially.

Two real ``python -m service`` processes share a three-master cluster (each is given a
different node's URL). Concurrent misses of the same users hit both; then event batches, retries
of them through the other replica, and ranks of the same users are interleaved through both.
Every event must be counted once across the replicas, each replica must encode a cold user's
history at most once, and the final scores from either replica must equal a single in-process
service that received the same batches one after the other (within 1e-5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from loadtest.harness import LiveService, LocalCluster, running_service
from service.api.deps import Services
from tests.service.test_consistency import ACTIONS, assert_matches, rank
from tests.support import (
    TEST_REQUEST_BUDGET_SECONDS,
    events_payload,
    make_settings,
    service_client,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

USERS = [101, 202, 303, 404, 505, 606]
CANDIDATES = list(range(0, 1100, 23))  # some beyond the catalogue (out-of-vocabulary)
BATCHES = 6
EVENTS_PER_BATCH = 5


@pytest.fixture
def replicas(
    local_cluster: LocalCluster,
    cluster_prefix: str,
    decay_artifact_dir: Path,
    tmp_path: Path,
) -> Iterator[list[LiveService]]:
    """Two service processes on the cluster, each started through a different node."""
    with ExitStack() as stack:
        started = []
        for i, node in enumerate(local_cluster.nodes[:2]):
            env = {
                "IFA_STORE": "redis",
                "IFA_REDIS_CLUSTER": "true",
                "IFA_REDIS_URL": f"redis://127.0.0.1:{node.port}/0",
                "IFA_REDIS_PREFIX": cluster_prefix,
                # One process per replica, so that "at most one encode per replica" below is
                # about replicas (a replica's several workers are replicas of one another too).
                "IFA_WORKERS": "1",
                # Answers, not speed: a burst of cold misses on a loaded CI machine may spend the
                # production state budget and answer degraded (history_length 0).
                "IFA_REQUEST_BUDGET_SECONDS": str(TEST_REQUEST_BUDGET_SECONDS),
            }
            log = tmp_path / f"replica-{i}.log"
            started.append(stack.enter_context(running_service(decay_artifact_dir, log, env=env)))
        yield started


def encodes(metrics: str) -> float:
    """Whole histories this process has encoded (the encode stage's count)."""
    for line in metrics.splitlines():
        if line.startswith('ifa_rank_stage_duration_seconds_count{stage="encode"}'):
            return float(line.split()[-1])
    return 0.0


def expected_items(body: dict[str, Any]) -> dict[int, tuple[float, list[float]]]:
    return {
        item["item_id"]: (item["score"], [item["probabilities"][name] for name in ACTIONS])
        for item in body["items"]
    }


async def test_two_replicas_on_a_cluster_end_like_one_serial_process(
    replicas: list[LiveService], decay_artifact_dir: Path
) -> None:
    rng = np.random.default_rng(21)
    batches = {
        user: [
            events_payload(user, EVENTS_PER_BATCH, rng, start=b * EVENTS_PER_BATCH)
            for b in range(BATCHES)
        ]
        for user in USERS
    }
    clients = [httpx.AsyncClient(base_url=r.url, timeout=60) for r in replicas]
    try:
        # 1. Every user's first batch through replica 0, then concurrent misses on both replicas.
        for user in USERS:
            first = await clients[0].post("/events", json=batches[user][0])
            assert first.json() == {"accepted": EVENTS_PER_BATCH, "duplicates": 0}
        cold = await asyncio.gather(
            *(rank(clients[i % 2], user, CANDIDATES) for user in USERS for i in range(6))
        )
        assert {body["history_length"] for body in cold} == {EVENTS_PER_BATCH}
        for user_index in range(len(USERS)):
            bodies = cold[user_index * 6 : (user_index + 1) * 6]
            for body in bodies[1:]:  # both replicas computed the same state
                assert_matches(body, expected_items(bodies[0]))
        # Each user encoded somewhere, and at most once per replica (single flight).
        per_replica = [encodes((await client.get("/metrics")).text) for client in clients]
        assert sum(per_replica) >= len(USERS)
        assert max(per_replica) <= len(USERS), per_replica

        # 2. The other batches, each through a random replica and half of them retried through
        # the other one at the same time, interleaved with ranks of the same users on both.
        calls = []
        retried = 0
        for user in USERS:
            for payload in batches[user][1:]:
                side = int(rng.integers(0, 2))
                calls.append(clients[side].post("/events", json=payload))
                if rng.random() < 0.5:
                    calls.append(clients[1 - side].post("/events", json=payload))
                    retried += 1
                calls.append(clients[1 - side].post(
                    "/rank", json={"user_id": user, "candidate_ids": CANDIDATES, "k": 5}
                ))  # fmt: skip
        order = rng.permutation(len(calls))
        responses = await asyncio.gather(*(calls[i] for i in order))
        assert [r.status_code for r in responses] == [200] * len(responses)
        posted = [r.json() for r in responses if "accepted" in r.json()]
        distinct = len(USERS) * (BATCHES - 1) * EVENTS_PER_BATCH
        assert sum(p["accepted"] for p in posted) == distinct  # each event counted once
        assert sum(p["duplicates"] for p in posted) == retried * EVENTS_PER_BATCH

        finals = {
            user: [await rank(client, user, CANDIDATES) for client in clients] for user in USERS
        }
    finally:
        for client in clients:
            await client.aclose()

    # 3. One process, one store, the same batches one after the other.
    async with service_client(make_settings(decay_artifact_dir)) as serial:
        services: Services = serial.app.state.services  # type: ignore[attr-defined]
        assert services.settings.store == "memory"
        for user in USERS:
            for payload in batches[user]:
                await serial.post("/events", json=payload)
        for user in USERS:
            expected = expected_items(await rank(serial, user, CANDIDATES))
            for body in finals[user]:
                assert body["history_length"] == BATCHES * EVENTS_PER_BATCH
                assert_matches(body, expected)
