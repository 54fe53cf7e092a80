"""The own-logs path on real data: MovieLens 100K written out as a team's three log files
(Parquet), then prepared, trained, exported and served; its behaviour replays through /events
and /rank scores a logged request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import World, label_columns, load_world
from model.movielens import load_movielens, movielens_root
from model.prepare import prepare
from service.replay import event_posts
from tests.support import make_settings, service_client, train_and_export

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def write_logs(world: World, out: Path) -> dict[str, Path]:
    """The world as the impression log, behaviour log and item table a team would have."""
    out.mkdir(parents=True, exist_ok=True)
    c, rq = world.candidates, world.requests
    per_request = np.diff(world.candidate_offsets)
    impressions = {
        "request_id": c["request_id"],
        "user_id": np.repeat(rq["user_id"], per_request),
        "request_time": np.repeat(rq["request_time"], per_request),
        "item_id": c["item_id"],
        "shown": c["y_impression"],
        **{name: c[f"y_{name}"] for name in world.actions[1:]},
    }
    names = np.array(world.actions)
    behaviour = {
        "user_id": world.events["user_id"],
        "item_id": world.events["item_id"],
        "action": names[world.events["action"].astype(np.int64)],
        "timestamp": world.events["timestamp"],
    }
    items = {"item_id": world.items["item_id"], "genre": world.items["category"]}
    paths = {}
    for name, table in (("impressions", impressions), ("behaviour", behaviour), ("items", items)):
        paths[name] = out / f"{name}.parquet"
        pq.write_table(pa.table(table), paths[name])
    return paths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, Path, Path]:
    try:
        movielens_root()
    except FileNotFoundError as missing:
        pytest.skip(f"MovieLens 100K is not beside the repository: {missing}")
    root = tmp_path_factory.mktemp("movielens-logs")
    original = load_movielens(n_next=2, n_negatives=8)
    logs = write_logs(original, root / "logs")
    report = prepare(
        logs["impressions"],
        logs["behaviour"],
        logs["items"],
        root / "world",
        item_attributes=("genre",),
    )
    assert report["dropped"] == {}
    fusion = {"click": 1.0, "like": 0.5}
    train_and_export(root / "world", root / "artifacts", fusion, batch_size=32, max_requests=128)
    return original, root / "world", root / "artifacts"


def test_the_prepared_world_holds_what_movielens_holds(
    prepared: tuple[World, Path, Path],
) -> None:
    original, world_dir, _ = prepared
    world = load_world(world_dir)
    assert world.actions == original.actions
    assert np.array_equal(world.events["action"], original.events["action"])
    assert np.array_equal(world.events["timestamp"], original.events["timestamp"])
    assert world.n_requests == original.n_requests
    for column in label_columns(world.objectives):
        assert world.candidates[column].sum() == original.candidates[column].sum()


async def test_movielens_logs_serve_after_a_replay(prepared: tuple[World, Path, Path]) -> None:
    _, world_dir, artifacts = prepared
    world = load_world(world_dir)
    user = int(world.requests["user_id"][-1])
    mine = world.events["user_id"] == user
    async with service_client(make_settings(artifacts, store="memory")) as client:
        info = (await client.get("/model")).json()
        assert info["actions"] == list(world.actions)
        posts = event_posts(world, int(info["limits"]["max_events_per_post"]))
        own = [[e for e in events if e["user_id"] == user] for events in posts]
        for events in (e for e in own if e):
            answer = await client.post("/events", json={"events": events})
            assert answer.status_code == 200, answer.text
        candidates = world.candidates["item_id"][world.candidate_rows(world.n_requests - 1)]
        ranked = await client.post(
            "/rank", json={"user_id": user, "candidate_ids": candidates.tolist()}
        )
        assert ranked.status_code == 200, ranked.text
        body = ranked.json()
        assert body["history_length"] == min(int(mine.sum()), info["limits"]["max_history"]) > 0
        for item in body["items"]:
            p = item["probabilities"]
            assert item["score"] == pytest.approx(
                p["impression"] * (p["click"] + 0.5 * p["like"]), rel=1e-5, abs=1e-7
            )
