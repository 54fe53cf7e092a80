"""The exact-match channel served end to end: /rank equals the training forward of the
checkpoint on the user's window (after folds and fold-outs at the history cap), on every store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.artifact import CHECKPOINT_FILE, LATEST_FILE, load_artifact
from model.batch import Request, collate
from model.checkpoint import load_checkpoint
from model.nets.ifa import IFA
from tests.support import T0, events_payload, make_settings, rank_all, service_client

pytestmark = pytest.mark.anyio
TOLERANCE = 1e-5
WINDOW = 32
REQUEST_TIME = T0 + 3 * 86400.0
ACTIONS = ["impression", "click", "long_view", "like"]


def training_forward(
    root: Path, user_id: int, events: list[dict[str, Any]], candidates: list[int]
) -> np.ndarray:
    """(M, 4) probabilities of the checkpoint's network, as it trains: one collated request of
    ``events`` scored at REQUEST_TIME."""
    directory = root / (root / LATEST_FILE).read_text().strip()
    net = load_checkpoint(directory / CHECKPOINT_FILE).net
    assert isinstance(net, IFA) and net.encoder.channel is not None
    model = load_artifact(root)
    spec = model.spec
    item_rows, _ = model.catalogue.rows(np.array([e["item_id"] for e in events]))
    times = np.array([e["timestamp"] for e in events], dtype=np.float64)
    actions = np.array([spec.action_index(e["action"]) for e in events])
    request = Request(
        spec.user_rows({"user_id": np.array([user_id])})[0],
        model.catalogue.rows(np.array(candidates))[0],
        spec.event_rows(item_rows, actions, times),
        times,
        REQUEST_TIME,
    )
    batch = collate([request], len(spec.event_fields), len(spec.item_fields))
    with torch.no_grad():
        return torch.sigmoid(net.eval()(batch)[0]).numpy()


async def test_served_probabilities_equal_the_training_forward_at_the_history_cap(
    channel_artifact_dir: Path, store_settings: dict[str, Any]
) -> None:
    rng = np.random.default_rng(11)
    user = 9
    candidates = [int(c) for c in rng.choice(1000, 40, replace=False)] + [1500]  # one unknown
    posted: list[dict[str, Any]] = []
    outcomes: list[str] = []
    settings = make_settings(channel_artifact_dir, max_history=WINDOW, **store_settings)
    async with service_client(settings) as client:
        ranker = client.app.state.services.ranker  # type: ignore[attr-defined]
        for start in (0, 20, 40):  # 60 events: the later batches fold in, the oldest fold out
            batch = events_payload(user, 20, rng, start=start, spacing=1800.0)
            posted += batch["events"]
            assert (await client.post("/events", json=batch)).status_code == 200
            outcomes.append((await rank_all(client, user, candidates, REQUEST_TIME))["state_cache"])
            await ranker.drain(5)  # the state a rank computed is written back in the background
        body = await rank_all(client, user, candidates, REQUEST_TIME)
    # The later batches were folded into a cached state (and the oldest events out of it).
    assert outcomes[0] == "miss" and "stale" in outcomes[1:], outcomes
    assert body["history_length"] == WINDOW
    expected = training_forward(channel_artifact_dir, user, posted[-WINDOW:], candidates)
    served = {item["item_id"]: item["probabilities"] for item in body["items"]}
    for i, item in enumerate(candidates):
        got = [served[item][name] for name in ACTIONS]
        np.testing.assert_allclose(got, expected[i], atol=TOLERANCE, rtol=0)
    # The window matters: the whole history scores differently.
    whole = training_forward(channel_artifact_dir, user, posted, candidates)
    assert np.abs(whole - expected).max() > 100 * TOLERANCE


async def test_get_model_names_the_network_and_its_channel(
    channel_artifact_dir: Path, artifact_dir: Path
) -> None:
    async with service_client(make_settings(channel_artifact_dir)) as client:
        info = (await client.get("/model")).json()
    assert info["net"] == "ifa_channel"
    assert info["channel"] == {"fields": ["category"], "slots": [8]}
    assert info["key_dim"] == 16 + 8  # the state's rows: key dim + one per category
    assert info["state_bytes"] <= 16 * 1024
    async with service_client(make_settings(artifact_dir)) as client:
        plain = (await client.get("/model")).json()
    assert (plain["net"], plain["channel"], plain["key_dim"]) == ("ifa", None, 16)
