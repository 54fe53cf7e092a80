"""First run: the store is seeded from a world directory, fast and only once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.api.deps import Services
from service.seed import load_seed
from service.stores.memory import MemoryStore
from tests.support import T0, make_settings, service_client

PROFILE_FIELDS = ("user_id", "age_group", "gender", "region")


def write_world(path: Path, n_users: int, n_events: int, seed: int = 0) -> Path:
    """events.parquet and users.parquet as model.data lays them out (sorted by user, time)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    users = np.sort(rng.choice(10 * n_users, n_users, replace=False)).astype(np.int64)
    owner = np.sort(rng.integers(0, n_users, n_events))
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(users[owner], pa.int64()),
                "item_id": pa.array(rng.integers(0, 1000, n_events), pa.int64()),
                "action": pa.array(rng.integers(0, 4, n_events), pa.int8()),
                "timestamp": pa.array(T0 + np.arange(n_events, dtype=np.float64), pa.float64()),
            }
        ),
        path / "events.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(users, pa.int64()),
                "age_group": pa.array(rng.integers(0, 8, n_users), pa.int64()),
                "gender": pa.array(rng.integers(0, 3, n_users), pa.int64()),
                "region": pa.array(rng.integers(0, 32, n_users), pa.int64()),
                "topic_affinity": pa.array(rng.random(n_users), pa.float64()),  # latent: unused
            }
        ),
        path / "users.parquet",
    )
    return path


def test_load_seed_cuts_histories_per_user(tmp_path: Path) -> None:
    world = write_world(tmp_path / "world", n_users=20, n_events=300)
    histories = load_seed(world, ("impression", "click", "long_view", "like"), PROFILE_FIELDS)
    events = pq.read_table(world / "events.parquet").to_pydict()
    assert len(histories.records) == 300
    for u, user_id in enumerate(histories.user_ids.tolist()):
        rows = [i for i, owner in enumerate(events["user_id"]) if owner == user_id]
        chunk = histories.records[histories.bounds[u] : histories.bounds[u + 1]]
        assert chunk["item_id"].tolist() == [events["item_id"][i] for i in rows]
        assert chunk["action"].tolist() == [events["action"][i] for i in rows]
    assert set(next(iter(histories.profiles.values()))) == {"age_group", "gender", "region"}


def test_actions_are_reindexed_into_the_models_vocabulary(tmp_path: Path) -> None:
    world = write_world(tmp_path / "world", n_users=3, n_events=50)
    histories = load_seed(world, ("like", "click"), PROFILE_FIELDS)
    raw = pq.read_table(world / "events.parquet").column("action").to_numpy()
    expected = np.array([-1, 1, -1, 0])[raw]  # impression, long_view not in this vocabulary
    assert sorted(histories.records["action"].tolist()) == sorted(expected.tolist())


def test_a_world_is_read_in_the_vocabulary_it_declares(tmp_path: Path) -> None:
    world = write_world(tmp_path / "world", n_users=3, n_events=50)
    vocabulary = ["impression", "click", "cart", "purchase"]
    (world / "world.json").write_text(json.dumps({"actions": vocabulary}))
    raw = pq.read_table(world / "events.parquet").column("action").to_numpy()
    same = load_seed(world, tuple(vocabulary), PROFILE_FIELDS)
    assert sorted(same.records["action"].tolist()) == sorted(raw.tolist())
    histories = load_seed(world, ("purchase", "cart", "click"), PROFILE_FIELDS)
    expected = np.array([-1, 2, 1, 0])[raw]  # by name: the store's "click" is index 2
    assert sorted(histories.records["action"].tolist()) == sorted(expected.tolist())


@pytest.mark.anyio
async def test_the_app_seeds_its_store_at_start(tmp_path: Path, artifact_dir: Path) -> None:
    world = write_world(tmp_path / "world", n_users=10, n_events=200)
    events = pq.read_table(world / "events.parquet").to_pydict()
    user = events["user_id"][0]
    count = events["user_id"].count(user)
    async with service_client(make_settings(artifact_dir, seed_world=world)) as client:
        body = (await client.post("/rank", json={"user_id": user, "candidate_ids": [1, 2]})).json()
        assert body["history_length"] == count
        services = client.app.state.services  # type: ignore[attr-defined]
        assert isinstance(services, Services)
        profile = (await services.store.snapshot("any", user, 60)).profile
        users = pq.read_table(world / "users.parquet").to_pydict()
        row = users["user_id"].index(user)
        assert profile == {name: users[name][row] for name in ("age_group", "gender", "region")}


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_million_events_seed_in_seconds(tmp_path: Path) -> None:
    world = write_world(tmp_path / "world", n_users=10_000, n_events=1_000_000)
    started = time.perf_counter()
    histories = load_seed(world, ("impression", "click", "long_view", "like"), PROFILE_FIELDS)
    written = await MemoryStore().seed(histories)
    elapsed = time.perf_counter() - started
    assert written == len(histories.user_ids)
    assert elapsed < 10.0, f"seeding 1e6 events took {elapsed:.1f} s"
