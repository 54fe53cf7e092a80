"""Single flight (concurrent misses of one user share one encode) never costs read-your-writes.

A flight's log read is held open with a gate in the store (the interleaving a slow store makes,
which timing alone would provoke only now and then): an event is acknowledged meanwhile, and the
request that joins the flight must still see it. A leader cancelled mid-flight leaves the flight
to finish for the others and to end by itself. The live test posts events and ranks at once
through the real service on Redis, and no answer ever misses an acknowledged event.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from loadtest.harness import running_service
from service.api.deps import Services
from tests.support import T0, events_payload, make_settings, service_client

pytestmark = pytest.mark.anyio
CANDIDATES = list(range(20))
TOKEN = "flight-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUEST_TIME = T0 + 30 * 86400.0


class _GatedLogReads:
    """A store whose whole-window log reads (a miss's encode) wait, once read, until released."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.reads = 0

    async def read_events(self, user_id: int, cursor: int, stop: int | None = None) -> Any:
        log = await self.inner.read_events(user_id, cursor, stop)
        if cursor == 0 and stop is None:
            self.reads += 1
            self.holding.set()
            await self.release.wait()
        return log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def services_of(client: httpx.AsyncClient) -> Services:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    return services


async def rank(client: httpx.AsyncClient, user_id: int) -> dict[str, Any]:
    body = {"user_id": user_id, "candidate_ids": CANDIDATES, "request_time": REQUEST_TIME}
    response = await client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_a_joiner_with_a_newer_snapshot_sees_the_event_acknowledged_meanwhile(
    artifact_dir: Path,
) -> None:
    rng = np.random.default_rng(3)
    async with service_client(make_settings(artifact_dir, store="memory")) as client:
        ranker = services_of(client).ranker
        await client.post("/events", json=events_payload(5, 10, rng))
        gated = _GatedLogReads(ranker.store)
        ranker.store = gated
        leader = asyncio.create_task(rank(client, 5))
        await gated.holding.wait()  # the flight has read 10 events and is held
        acknowledged = await client.post("/events", json=events_payload(5, 1, rng, start=10))
        assert acknowledged.json()["accepted"] == 1
        joiner = asyncio.create_task(rank(client, 5))
        for _ in range(50):  # let the joiner take its snapshot and join the flight
            await asyncio.sleep(0)
        gated.release.set()
        first, second = await leader, await joiner
    assert gated.reads == 1  # the joiner shared the flight's encode
    assert first["history_length"] == 10
    assert second["history_length"] == 11


async def test_a_cancelled_leader_leaves_the_flight_to_finish_and_end(artifact_dir: Path) -> None:
    rng = np.random.default_rng(4)
    async with service_client(make_settings(artifact_dir, store="memory")) as client:
        ranker = services_of(client).ranker
        await client.post("/events", json=events_payload(6, 12, rng))
        gated = _GatedLogReads(ranker.store)
        ranker.store = gated
        leader = asyncio.create_task(ranker.user_state(6))
        await gated.holding.wait()
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        # The flight runs on: a request now joins it instead of encoding again.
        joiner = asyncio.create_task(rank(client, 6))
        for _ in range(50):
            await asyncio.sleep(0)
        gated.release.set()
        answer = await joiner
        assert gated.reads == 1
        assert answer["history_length"] == 12
        await ranker.drain(10.0)
        await asyncio.sleep(0)
        assert not ranker._inflight  # the flight ended once its state was stored
        again = await rank(client, 6)
    assert again["state_cache"] == "hit"


def _post_and_rank(url: str, user_id: int, batches: int, rankers: int) -> list[str]:
    """Post ``batches`` one-event batches from one thread while ``rankers`` threads rank the
    same user; each rank must include every event acknowledged before it was sent. Returns the
    violations found (empty when read-your-writes held)."""
    acknowledged = 0
    lock = threading.Lock()
    done = threading.Event()
    violations: list[str] = []
    rng = np.random.default_rng(user_id)
    payloads = [events_payload(user_id, 1, rng, start=i) for i in range(batches)]

    def post() -> None:
        nonlocal acknowledged
        with httpx.Client(base_url=url, timeout=30) as client:
            for payload in payloads:
                response = client.post("/events", json=payload, headers=AUTH)
                assert response.status_code == 200, response.text
                with lock:
                    acknowledged += 1
        done.set()

    def ranks() -> None:
        body = {"user_id": user_id, "candidate_ids": CANDIDATES, "request_time": REQUEST_TIME}
        with httpx.Client(base_url=url, timeout=30) as client:
            while not done.is_set():
                with lock:
                    before = acknowledged
                response = client.post("/rank", json=body)
                if response.status_code != 200:
                    violations.append(f"/rank {response.status_code}: {response.text}")
                    continue
                answer = response.json()
                if answer["state_cache"] == "degraded":
                    continue  # says it may be behind
                if answer["history_length"] < before:
                    violations.append(
                        f"{answer['state_cache']} answer of {answer['history_length']} events "
                        f"after {before} were acknowledged"
                    )

    threads = [threading.Thread(target=post)] + [
        threading.Thread(target=ranks) for _ in range(rankers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return violations


@pytest.mark.e2e
@pytest.mark.redis
def test_ranks_never_miss_an_acknowledged_event_on_the_live_service(
    artifact_dir: Path, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_URL": redis_url,
        "IFA_REDIS_PREFIX": redis_prefix,
        "IFA_API_TOKEN": TOKEN,
        "IFA_REQUEST_BUDGET_SECONDS": "10",  # answers are judged here, not their speed
    }
    with running_service(artifact_dir, tmp_path / "service.log", env=env, timeout=120) as service:
        violations: list[str] = []
        for user_id in range(3):  # cold users: the first ranks miss and fly together
            violations += _post_and_rank(service.url, 900 + user_id, batches=40, rankers=4)
    assert violations == []
