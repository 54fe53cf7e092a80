"""At start the service logs which store it uses, where (no password) and how many users it
holds; an empty store says why every user ranks with ``history_length: 0``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis as redis_sync

from service.stores import redacted_url
from service.stores.base import NewEvent, UserCount
from service.stores.memory import MemoryStore
from service.stores.redis import RedisStore
from tests.support import make_settings, service_client

pytestmark = pytest.mark.anyio


def events_of(user_ids: list[int]) -> list[NewEvent]:
    return [NewEvent(f"e-{u}", u, 10 + u, 1, 1.7e9 + u) for u in user_ids]


async def test_memory_store_counts_users_with_a_log() -> None:
    store = MemoryStore()
    assert await store.count_users(budget=10) == UserCount(users=0, complete=True)
    await store.append_events(events_of([1, 2, 2, 3]))
    assert await store.count_users(budget=10) == UserCount(users=3, complete=True)


@pytest.mark.redis
async def test_redis_store_counts_the_log_keys_of_its_prefix_alone(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    neighbour = RedisStore(redis_url, prefix=f"{redis_prefix}-other")
    try:
        await store.append_events(events_of([1, 2, 3]))
        await store.put_profile(4, {"age": 3})  # a profile without a log is not a user's history
        await neighbour.append_events(events_of([5]))
        assert await store.count_users(budget=10**9) == UserCount(users=3, complete=True)
    finally:
        await neighbour.delete_prefix()
        await store.close()
        await neighbour.close()


@pytest.mark.redis
async def test_redis_count_stops_at_its_budget(redis_url: str, redis_prefix: str) -> None:
    users = 5000
    client = redis_sync.Redis.from_url(redis_url)
    with client.pipeline(transaction=False) as pipe:
        for u in range(users):
            pipe.set(f"{redis_prefix}:{{u:{u}}}:log", b"x")
        pipe.execute()
    client.close()
    store = RedisStore(redis_url, prefix=redis_prefix)
    try:
        capped = await store.count_users(budget=1000)
        assert not capped.complete
        assert capped.users < users
        assert await store.count_users(budget=10**9) == UserCount(users=users, complete=True)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@cache:6379/1", "redis://:***@cache:6379/1"),
        ("rediss://app:p%40ss@cache.example:6380/0", "rediss://app:***@cache.example:6380/0"),
    ],
)
def test_redacted_url_hides_the_password_only(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


async def test_start_with_an_empty_memory_store_says_why_history_length_is_0(
    artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    async with service_client(make_settings(artifact_dir)):
        pass
    text = caplog.text
    assert "store memory (this process's memory, lost when it exits) holds 0 users" in text
    assert "every user ranks with history_length 0" in text
    assert "--seed-world" in text


@pytest.mark.redis
async def test_start_on_redis_logs_where_and_how_many_users(
    artifact_dir: Path, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    await store.append_events(events_of([7, 8]))
    await store.close()
    caplog.set_level(logging.INFO, logger="service")
    settings = make_settings(
        artifact_dir, store="redis", redis_url=redis_url, redis_prefix=redis_prefix
    )
    async with service_client(settings):
        pass
    where = f"{redacted_url(redis_url)}, key prefix '{redis_prefix}'"
    assert f"store redis ({where}) holds 2 users" in caplog.text
    assert "history_length 0" not in caplog.text
