"""The service over a real Redis at the edges of its memory: a user whose keys expired comes back
to an empty history rebuilt from new events, and a Redis too full to take a write gets the
/events a 503 (never a 2xx), with nothing half-written."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from loadtest.harness import redis_process
from tests.support import T0, events_payload, make_settings, service_client

pytestmark = [pytest.mark.anyio, pytest.mark.redis]
REQUEST_TIME = T0 + 30 * 86400.0


def wait_until_gone(client: redis.Redis, pattern: str) -> None:
    """Until Redis has expired every key matching ``pattern`` (the poll only waits for it)."""
    for _ in range(200):
        if not list(client.scan_iter(match=pattern)):
            return
        time.sleep(0.05)
    raise AssertionError(f"keys matching {pattern} still there")


async def test_a_user_back_after_the_retention_gets_a_state_of_new_events_only(
    artifact_dir: Path, redis_url: str, redis_prefix: str
) -> None:
    rng = np.random.default_rng(6)
    settings = make_settings(
        artifact_dir,
        store="redis",
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        user_retention_seconds=1,
        state_ttl_seconds=1,
    )
    client = redis.Redis.from_url(redis_url)
    rank = {"user_id": 5, "candidate_ids": [3, 4], "request_time": REQUEST_TIME}
    try:
        async with service_client(settings) as service:
            first = await service.post("/events", json=events_payload(5, 8, rng))
            assert first.json()["accepted"] == 8
            assert (await service.post("/rank", json=rank)).json()["history_length"] == 8
            wait_until_gone(client, f"{redis_prefix}:{{u:5}}:*")
            # The same ids again, with other items: the old ones are forgotten, not duplicates.
            again = await service.post("/events", json=events_payload(5, 3, rng))
            assert (again.json()["accepted"], again.json()["duplicates"]) == (3, 0)
            ranked = (await service.post("/rank", json=rank)).json()
            assert (ranked["history_length"], ranked["state_cache"]) == (3, "miss")
            explained = await service.post("/explain", json={"user_id": 5, "item_id": 3})
            assert explained.json()["history_length"] == 3
    finally:
        client.close()


async def test_a_redis_too_full_to_write_answers_events_with_503(
    artifact_dir: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    batch = events_payload(6, 4, rng)
    with redis_process(tmp_path / "redis") as server:
        settings = make_settings(artifact_dir, store="redis", redis_url=server.url)
        client = redis.Redis.from_url(server.url)
        try:
            async with service_client(settings) as service:
                # The deployed policy evicts only keys with a TTL; with none to evict and the
                # memory over its limit, Redis refuses every write that would take memory.
                client.config_set("maxmemory-policy", "volatile-lru")
                client.config_set("maxmemory", 1)
                refused = await service.post("/events", json=batch)
                assert refused.status_code == 503, refused.text
                client.config_set("maxmemory", 0)
                assert list(client.scan_iter(match="*{u:6}*")) == []  # nothing half-written
                accepted = await service.post("/events", json=batch)
                assert accepted.status_code == 200
                assert accepted.json()["accepted"] == 4
        finally:
            client.close()
