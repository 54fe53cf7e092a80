"""The store's layout record: stored actions are the store's indices, read by name by whichever
model serves; a model or worker that would misread the logs is refused at start and at rollout.
The contract runs on the in-process store, a real Redis and a real Redis Cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.artifact import load_manifest
from model.features import ACTIONS
from service.stores.base import Store
from service.stores.layout import ActionMapping, LayoutMismatch, StoreLayout, reconcile
from service.stores.memory import MemoryStore
from service.stores.redis import RedisStore
from tests.service.test_consistency import assert_matches, from_scratch, rank
from tests.service.test_rollout import AUTH, FAST, eventually, services_of, serving
from tests.service.test_stores import REDIS_BACKENDS, open_redis
from tests.support import build_artifact, events_payload, make_settings, service_client

pytestmark = pytest.mark.anyio
REORDERED = ("like", "long_view", "click", "impression")
EXTENDED = (*ACTIONS, "share")
CANDIDATES = list(range(30))


# -- the rule -------------------------------------------------------------------------------


def test_a_first_model_writes_its_list_and_a_later_one_appends_what_is_new() -> None:
    first = reconcile(None, ACTIONS, 100)
    assert first == StoreLayout(ACTIONS, 100)
    assert reconcile(first, REORDERED, 100) == first  # the store's order stays
    assert reconcile(first, ("share", *REORDERED), 100).actions == (*ACTIONS, "share")


@pytest.mark.parametrize(
    ("actions", "max_history", "says"),
    [
        (("impression", "click", "like"), 100, "lack ['long_view']"),
        (ACTIONS, 200, "max_history=100"),
        (("click", "click", "long_view", "like", "impression"), 100, "repeats ['click']"),
    ],
)
def test_a_model_that_would_misread_the_logs_is_refused(
    actions: tuple[str, ...], max_history: int, says: str
) -> None:
    with pytest.raises(LayoutMismatch, match=says.replace("[", r"\[").replace("]", r"\]")):
        reconcile(StoreLayout(ACTIONS, 100), actions, max_history)


def test_a_mapping_reads_stored_indices_as_the_models_by_name() -> None:
    layout = StoreLayout((*ACTIONS, "share"), 100)
    mapping = ActionMapping.bind(layout, ("share", *REORDERED))
    assert mapping.to_store == {"share": 4, "like": 3, "long_view": 2, "click": 1, "impression": 0}
    # Stored 0..4 = impression, click, long_view, like, share; then one the store appended
    # later (5) and a seeded action no model had (-1): both the model's out-of-vocabulary row.
    stored = np.array([0, 1, 2, 3, 4, 5, -1])
    assert mapping.model_actions(stored).tolist() == [4, 3, 2, 1, 0, -1, -1]


def test_a_record_this_service_did_not_write_is_refused() -> None:
    assert StoreLayout.decode(StoreLayout(ACTIONS, 7).encode()) == StoreLayout(ACTIONS, 7)
    for blob in (b"{not json", b'{"actions": [1], "max_history": 7}', b'{"actions": []}'):
        with pytest.raises(LayoutMismatch):
            StoreLayout.decode(blob)


# -- every store applies it atomically ------------------------------------------------------


@pytest.fixture(params=["memory", *REDIS_BACKENDS])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    redis_store, _ = open_redis(request, request.param)
    try:
        yield redis_store
    finally:
        await redis_store.close()


async def test_the_store_keeps_one_record_and_a_refused_model_leaves_it_unchanged(
    store: Store,
) -> None:
    assert await store.agree_layout(ACTIONS, 50) == StoreLayout(ACTIONS, 50)
    with pytest.raises(LayoutMismatch, match="max_history=50"):
        await store.agree_layout(EXTENDED, 60)
    # Refused with "share": the name did not stay behind to bind the models after it.
    assert await store.agree_layout(REORDERED, 50) == StoreLayout(ACTIONS, 50)
    assert await store.agree_layout(EXTENDED, 50) == StoreLayout(EXTENDED, 50)
    with pytest.raises(LayoutMismatch, match="lack"):
        await store.agree_layout(ACTIONS, 50)


async def test_workers_extending_at_once_append_each_name_once(store: Store) -> None:
    await store.agree_layout(ACTIONS, 50)
    agreed = await asyncio.gather(*(store.agree_layout(EXTENDED, 50) for _ in range(8)))
    assert set(agreed) == {StoreLayout(EXTENDED, 50)}


@pytest.mark.redis
async def test_redis_refuses_a_record_it_did_not_write(request: pytest.FixtureRequest) -> None:
    redis_store, _ = open_redis(request, "redis")
    try:
        await redis_store._client.set(f"{redis_store.prefix}:layout", b"[1, 2]")
        with pytest.raises(LayoutMismatch, match="unreadable"):
            await redis_store.agree_layout(ACTIONS, 50)
    finally:
        await redis_store.close()


# -- the service: a new vocabulary reads the old logs by name, or is refused ----------------


@pytest.fixture
def export_root(tmp_path: Path) -> Path:
    return build_artifact(tmp_path / "models", time_decay=True)


async def test_a_reordered_and_extended_vocabulary_reads_the_stored_logs_by_name(
    export_root: Path, store_settings: dict[str, Any]
) -> None:
    posted = events_payload(1, 40, np.random.default_rng(3))
    async with service_client(make_settings(export_root, **FAST, **store_settings)) as client:
        assert (await client.post("/events", json=posted, headers=AUTH)).status_code == 200
        build_artifact(export_root, time_decay=True, actions=("share", *REORDERED))
        second = load_manifest(export_root)
        await eventually(lambda: serving(client, second.version))
        later = events_payload(1, 5, np.random.default_rng(4), start=40)
        later["events"][0]["action"] = "share"  # the new name, stored under a new index
        assert (await client.post("/events", json=later, headers=AUTH)).status_code == 200
        body = await rank(client, 1, CANDIDATES)
        stored = await services_of(client).store.agree_layout(("share", *REORDERED), 1000)
    assert stored.actions == EXTENDED  # appended, the old indices unchanged
    new_dir = export_root / second.version
    assert_matches(body, from_scratch(new_dir, 1, posted["events"] + later["events"], CANDIDATES))


async def test_a_rollout_to_a_model_that_lacks_a_stored_action_fails_and_says_why(
    export_root: Path,
) -> None:
    first = load_manifest(export_root)
    async with service_client(make_settings(export_root, **FAST)) as client:
        build_artifact(export_root, time_decay=True, seed=3, actions=("impression", "click"))
        services = services_of(client)

        async def failed() -> bool:
            return services.rollout.status.phase == "failed"

        await eventually(failed)
        assert "lack ['long_view', 'like']" in str(services.rollout.status.error)
        assert (await rank(client, 1, CANDIDATES))["model_version"] == first.version
        events = events_payload(2, 3, np.random.default_rng(0))
        assert (await client.post("/events", json=events, headers=AUTH)).status_code == 200


async def test_a_rollout_with_another_max_history_fails_and_says_why(export_root: Path) -> None:
    first = load_manifest(export_root)
    build_artifact(export_root, time_decay=True, seed=5, update_latest=False)
    other = next(p for p in export_root.iterdir() if p.is_dir() and p.name != first.version)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["max_history"] = 64  # trained on another window than the store keeps
    (other / "manifest.json").write_text(json.dumps(manifest))
    async with service_client(make_settings(export_root, **FAST)) as client:
        (export_root / "LATEST").write_text(f"{other.name}\n")
        services = services_of(client)

        async def failed() -> bool:
            return services.rollout.status.phase == "failed"

        await eventually(failed)
        assert "max_history=1000" in str(services.rollout.status.error)
        assert services.runtime.version == first.version


@pytest.mark.redis
async def test_a_worker_with_another_max_history_does_not_start_on_the_store(
    export_root: Path, redis_url: str, redis_prefix: str
) -> None:
    on_redis = {"store": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix}
    async with service_client(make_settings(export_root, max_history=50, **on_redis)):
        pass
    with pytest.raises(LayoutMismatch, match="IFA_MAX_HISTORY=50"):
        async with service_client(make_settings(export_root, max_history=80, **on_redis)):
            pass
    probe = RedisStore(redis_url, prefix=redis_prefix)
    try:
        assert (await probe.agree_layout(ACTIONS, 50)).max_history == 50
    finally:
        await probe.close()
