"""Fixtures shared across test directories.

A real Redis, small exported artefacts, and the ``live_*`` fixtures that run the real service
as a process (``python -m service``, see :mod:`loadtest.harness`) once per session for the
load-test and Prometheus tests.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from loadtest.harness import (
    LiveService,
    LocalCluster,
    redis_cluster,
    redis_server,
    running_service,
    warm_state_cache,
    write_world,
)
from tests.support import CATALOGUE_ITEMS, build_artifact

LIVE_USERS = 50


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- Redis: a real server, never a mock --------------------------------------------------


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: $REDIS_URL, else 127.0.0.1:6379, else a redis-server started here.

    Fails (never skips) when none can be had: the Redis store is only proven against Redis.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        if not _answers(url):
            pytest.fail(f"REDIS_URL={url} is set but does not answer PING")
        yield url
        return
    if _answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    if shutil.which("redis-server") is None:
        pytest.fail(
            "no Redis server: REDIS_URL is unset, nothing answers on 127.0.0.1:6379 and "
            "redis-server is not installed (apt-get install redis-server)"
        )
    with redis_server(tmp_path_factory.mktemp("redis")) as started:
        yield started


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = unique_prefix("ifa-test")
    yield prefix
    delete_keys(redis.Redis.from_url(redis_url), prefix)


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Redis Cluster of three masters started here (redis-server --cluster-enabled yes,
    joined by redis-cli --cluster create), shared by the session's cluster tests."""
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster_prefix(local_cluster: LocalCluster) -> Iterator[str]:
    """A key prefix of this test alone on the cluster; its keys are deleted afterwards."""
    prefix = unique_prefix("ifa-test")
    yield prefix
    delete_keys(redis.RedisCluster.from_url(local_cluster.url), prefix)


def unique_prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def delete_keys(client: redis.Redis | redis.RedisCluster, prefix: str) -> None:
    """Delete the keys under ``prefix`` (on a cluster, SCAN visits every master) and close."""
    try:
        for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
            client.delete(key)
    finally:
        client.close()


# -- exported artefacts --------------------------------------------------------------------


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export root (with LATEST) of a model without time decay."""
    return build_artifact(tmp_path_factory.mktemp("artefact"), time_decay=False)


@pytest.fixture(scope="session")
def decay_artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export root of a model with per-head time decay (folds must discount correctly)."""
    return build_artifact(tmp_path_factory.mktemp("artefact-decay"), time_decay=True, seed=1)


@pytest.fixture(scope="session")
def channel_artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export root of a model with the exact-match channel on the category, and time decay."""
    return build_artifact(
        tmp_path_factory.mktemp("artefact-channel"),
        time_decay=True,
        seed=2,
        net_name="ifa_channel",
    )


@pytest.fixture(scope="session")
def live_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 users with 40 events each over the test catalogue's items (ids 0..999)."""
    directory = tmp_path_factory.mktemp("live-world")
    items = np.arange(CATALOGUE_ITEMS)
    return write_world(directory, items, n_users=LIVE_USERS, events_per_user=40)


@pytest.fixture(scope="session")
def live_service(
    tmp_path_factory: pytest.TempPathFactory, live_world: Path, redis_url: str
) -> Iterator[LiveService]:
    """The service on the Redis store, seeded from ``live_world``, every user's state cached.

    Warming first makes latency thresholds measure the steady state the 50 ms budget is about,
    not the one-off encoding of each history. Keys live under a prefix of this session alone
    and are deleted afterwards.
    """
    model_dir = build_artifact(tmp_path_factory.mktemp("live-artifact"), time_decay=False)
    prefix = unique_prefix("ifa-live")
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_URL": redis_url,
        "IFA_REDIS_PREFIX": prefix,
        "IFA_SEED_WORLD": str(live_world),
        # Latency is judged by the load tests' thresholds; a 503 for a spent budget on a loaded
        # CI machine would fail them for the wrong reason.
        "IFA_REQUEST_BUDGET_SECONDS": "5",
    }
    log = tmp_path_factory.mktemp("live-service") / "service.log"
    try:
        with running_service(model_dir, log, env=env) as service:
            warm_state_cache(service.url, range(LIVE_USERS), range(100))
            yield service
    finally:
        delete_keys(redis.Redis.from_url(redis_url), prefix)


# -- parametrisations shared by the consistency tests ----------------------------------------


MODEL_DIRS = {
    "plain": "artifact_dir",
    "decay": "decay_artifact_dir",
    "channel": "channel_artifact_dir",
}


@pytest.fixture(params=list(MODEL_DIRS))
def model_dir(request: pytest.FixtureRequest) -> Path:
    """Each test runs on a model without and with time decay, and with the exact-match
    channel (and decay)."""
    path = request.getfixturevalue(MODEL_DIRS[request.param])
    assert isinstance(path, Path)
    return path


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each test runs on the in-process store, on a real Redis and on a real three-master
    Redis Cluster (a prefix of its own)."""
    if request.param == "memory":
        return {"store": "memory"}
    if request.param == "cluster":
        return {
            "store": "redis",
            "redis_cluster": True,
            "redis_url": request.getfixturevalue("local_cluster").url,
            "redis_prefix": request.getfixturevalue("cluster_prefix"),
        }
    return {
        "store": "redis",
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_prefix": request.getfixturevalue("redis_prefix"),
    }
