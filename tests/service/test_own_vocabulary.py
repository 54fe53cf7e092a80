"""A team's log in its own vocabulary (click, cart, purchase) trains, exports and serves: /model
lists its actions, /events takes them and refuses others, /rank's probabilities are named by
them and its score uses the fusion weights the model was exported with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.artifact import load_manifest, resolve_artifact_dir
from model.data import load_world
from model.prepare import prepare, write_example
from tests.support import make_settings, service_client, train_and_export

VOCABULARY = ["impression", "click", "cart", "purchase"]
FUSION = {"cart": 0.3, "purchase": 1.0}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(world, artefact directory): the example shop log prepared, trained briefly, exported."""
    root = tmp_path_factory.mktemp("shop")
    write_example(root / "logs")
    prepare(
        root / "logs" / "impressions.csv",
        root / "logs" / "behaviour.csv",
        root / "logs" / "items.csv",
        root / "world",
        item_attributes=("category", "brand", "seller"),
        max_cardinality=100,
    )
    train_and_export(root / "world", root / "artifacts", FUSION, batch_size=16, max_requests=64)
    return root / "world", root / "artifacts"


def test_the_trained_model_and_its_manifest_carry_the_vocabulary(shop: tuple[Path, Path]) -> None:
    _, artifacts = shop
    manifest = load_manifest(resolve_artifact_dir(artifacts))
    assert manifest.actions == VOCABULARY and manifest.objectives == VOCABULARY
    assert manifest.fusion == FUSION


@pytest.mark.anyio
async def test_the_service_speaks_the_logs_vocabulary(shop: tuple[Path, Path]) -> None:
    world_dir, artifacts = shop
    world = load_world(world_dir)
    async with service_client(make_settings(artifacts, store="memory")) as client:
        info = (await client.get("/model")).json()
        assert info["actions"] == VOCABULARY and info["objectives"] == VOCABULARY
        assert info["fusion"] == FUSION

        event = {"user_id": 3, "item_id": 1001, "timestamp": 1_700_100_000.0}
        taken = await client.post(
            "/events",
            json={
                "events": [
                    {**event, "event_id": "a", "action": "cart"},
                    {**event, "event_id": "b", "action": "purchase", "timestamp": 1_700_100_001.0},
                ]
            },
        )
        assert taken.status_code == 200 and taken.json()["accepted"] == 2
        refused = await client.post(
            "/events", json={"events": [{**event, "event_id": "c", "action": "like"}]}
        )
        assert refused.status_code == 422
        assert "one of ['impression', 'click', 'cart', 'purchase'], not 'like'" in refused.text

        candidates = world.candidates["item_id"][world.candidate_rows(0)].tolist()
        ranked = await client.post("/rank", json={"user_id": 3, "candidate_ids": candidates})
        assert ranked.status_code == 200
        items = ranked.json()["items"]
        assert len(items) == len(candidates)
        for item in items:
            p = item["probabilities"]
            assert list(p) == VOCABULARY
            expected = p["impression"] * (FUSION["cart"] * p["cart"] + p["purchase"])
            assert item["score"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        scores = np.array([i["score"] for i in items])
        assert np.all(np.diff(scores) <= 0)  # best first
