"""Store timing: a Redis call and its retry fit the user state's budget, a full pool makes a call
wait rather than fail, the cluster client follows the configured retry policy, and a failed item
lookup is not repeated by every request (on a cluster, only the shards of the failed node are
left alone). Real Redis servers throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pydantic
import pytest
import redis as redis_sync
from redis.asyncio.cluster import RedisCluster

from loadtest.harness import LocalCluster
from service.settings import Settings
from service.stores.base import ItemsUnavailable
from service.stores.redis import ITEM_SHARDS, RedisStore
from tests.service.test_items import NEW_ITEM, Clock, counts, live_catalogue
from tests.service.test_stores import REDIS_BACKENDS, open_redis

pytestmark = pytest.mark.anyio


def test_the_default_redis_call_and_its_retry_fit_the_state_budget() -> None:
    settings = Settings(store="redis")
    assert settings.redis_retries >= 1
    budget = settings.request_budget_seconds * settings.state_fetch_share
    assert settings.redis_call_seconds() <= budget


def test_settings_whose_redis_retry_cannot_fit_the_state_budget_are_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="more than the user state's budget"):
        Settings(store="redis", redis_timeout_seconds=0.25)
    # The memory store makes no Redis calls: nothing to order.
    assert Settings(store="memory", redis_timeout_seconds=0.25).store == "memory"


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_a_full_pool_makes_calls_wait_for_a_connection(
    request: pytest.FixtureRequest, backend: str
) -> None:
    store, url = open_redis(request, backend)
    await store.close()
    narrow = RedisStore(url, prefix=store.prefix, max_connections=1, cluster=backend == "cluster")
    try:
        # 32 calls at once on one connection (per node): each waits its turn, none fails.
        snapshots = await asyncio.gather(*(narrow.snapshot("v", user, 60) for user in range(32)))
    finally:
        await narrow.close()
    assert [s.log_length for s in snapshots] == [0] * 32


@pytest.mark.redis
async def test_the_cluster_client_retries_as_configured(local_cluster: LocalCluster) -> None:
    store = RedisStore(local_cluster.url, cluster=True, retries=2)
    try:
        client, items_client = store._client, store._items_client
        assert isinstance(client, RedisCluster) and isinstance(items_client, RedisCluster)
        assert client.retry.get_retries() == 2
        assert items_client.retry.get_retries() == 0  # items fall back instead
    finally:
        await store.close()


@pytest.mark.redis
async def test_a_failed_item_lookup_is_not_repeated_until_its_backoff_ends(
    artifact_dir: Path,
) -> None:
    gone = RedisStore("redis://127.0.0.1:1/0", timeout_seconds=0.05, retries=0)
    clock = Clock()
    catalogue, metrics = live_catalogue(artifact_dir, gone, clock)
    try:
        await catalogue.rows(np.array([NEW_ITEM, 5]))
        assert counts(metrics)["lookups"] == 1
        await catalogue.rows(np.array([NEW_ITEM, 6]))  # answered locally, degraded
        assert counts(metrics)["lookups"] == 1
        assert counts(metrics)["degraded"] == 4
        clock.now += 1.5
        await catalogue.rows(np.array([NEW_ITEM, 6]))
        assert counts(metrics)["lookups"] == 2
    finally:
        await gone.close()


@pytest.mark.redis
async def test_one_cluster_node_down_fails_only_the_item_shards_it_holds(
    artifact_dir: Path, local_cluster: LocalCluster, cluster_prefix: str
) -> None:
    store = RedisStore(local_cluster.url, prefix=cluster_prefix, cluster=True)
    ids = [100 * ITEM_SHARDS + shard for shard in range(ITEM_SHARDS)]  # id i in shard i
    victim = local_cluster.nodes[1].port
    paused = redis_sync.Redis(port=victim)
    try:
        await store.put_items({item_id: {"category": 3, "author": 7} for item_id in ids})
        client = store._items_client
        assert isinstance(client, RedisCluster)
        down = {
            shard
            for shard in range(ITEM_SHARDS)
            if getattr(client.get_node_from_key(store._item_key(shard)), "port", None) == victim
        }
        assert 0 < len(down) < ITEM_SHARDS
        paused.execute_command("CLIENT", "PAUSE", "5000", "ALL")
        with pytest.raises(ItemsUnavailable) as failed:
            await store.get_items(ids)
        # Within the backoff the node is not asked again: the same answer.
        with pytest.raises(ItemsUnavailable) as again:
            await store.get_items(ids)
        catalogue, metrics = live_catalogue(artifact_dir, store, Clock())
        rows = await catalogue.rows(np.array(ids))
    finally:
        paused.execute_command("CLIENT", "UNPAUSE")
        paused.close()
        await store.close()
    for partial in (failed.value, again.value):
        assert partial.unavailable == [shard in down for shard in range(ITEM_SHARDS)]
        assert partial.found == [
            None if shard in down else {"category": 3, "author": 7} for shard in range(ITEM_SHARDS)
        ]
    # The catalogue keeps what the other nodes answered: those ids are known items.
    assert rows.known.tolist() == [shard not in down for shard in range(ITEM_SHARDS)]
    assert counts(metrics)["degraded"] == len(down)
    assert counts(metrics)["miss"] == ITEM_SHARDS - len(down)
