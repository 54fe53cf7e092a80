"""The served state is the exported encoder applied to the whole history from scratch.

Whatever the path a state took (miss, folds of late and out-of-order events, retries, concurrent
posts and ranks), /rank must equal encoder(full history) + scorer within 1e-5, for a model with
and without time decay, on every store (in-process, one Redis, a Redis Cluster).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.artifact import load_artifact
from tests.support import (
    T0,
    events_payload,
    make_settings,
    rank_all,
    scores_from_scratch,
    service_client,
)

pytestmark = pytest.mark.anyio
TOLERANCE = 1e-5
REQUEST_TIME = T0 + 23 * 86400.0
"""Just after every event the tests post (at most 530 hours after T0)."""
ACTIONS = ["impression", "click", "long_view", "like"]


def from_scratch(
    model_dir: Path, user_id: int, events: list[dict[str, Any]], candidates: list[int]
) -> dict[int, tuple[float, list[float]]]:
    """item id -> (score, probabilities) from the exported programs on the whole history."""
    catalogue = load_artifact(model_dir).catalogue
    item_rows, _ = catalogue.rows(np.array([e["item_id"] for e in events], dtype=np.int64))
    candidate_rows, _ = catalogue.rows(np.array(candidates, dtype=np.int64))
    scores, probabilities = scores_from_scratch(
        model_dir, user_id, events, item_rows, candidate_rows, REQUEST_TIME
    )
    return {
        item: (float(scores[i]), probabilities[i].tolist()) for i, item in enumerate(candidates)
    }


async def rank(client: httpx.AsyncClient, user_id: int, candidates: list[int]) -> dict[str, Any]:
    return await rank_all(client, user_id, candidates, REQUEST_TIME)


def assert_matches(body: dict[str, Any], expected: dict[int, tuple[float, list[float]]]) -> None:
    assert len(body["items"]) == len(expected)
    for item in body["items"]:
        score, probabilities = expected[item["item_id"]]
        assert item["score"] == pytest.approx(score, abs=TOLERANCE)
        # The model's objectives, in its column order (/rank names them so).
        got = list(item["probabilities"].values())
        np.testing.assert_allclose(got, probabilities, atol=TOLERANCE, rtol=0)


async def test_folded_state_equals_the_full_history_from_scratch(
    model_dir: Path, store_settings: dict[str, Any]
) -> None:
    rng = np.random.default_rng(5)
    user, candidates = 42, [int(c) for c in rng.choice(1100, 60, replace=False)]
    posted: list[dict[str, Any]] = []
    async with service_client(make_settings(model_dir, **store_settings)) as client:
        first = await rank(client, user, candidates)
        assert (first["state_cache"], first["history_length"]) == ("miss", 0)

        # Batch 1, then a miss (whole log encoded), then a hit.
        batch = events_payload(user, 40, rng, start=100)
        posted += batch["events"]
        assert (await client.post("/events", json=batch)).json()["accepted"] == 40
        assert (await rank(client, user, candidates))["state_cache"] == "miss"
        # The miss writes its state back in the background; a request before that write lands
        # joins the miss (a first write on a new Redis Cluster loads its script on every master).
        await client.app.state.services.ranker.drain(5)  # type: ignore[attr-defined]
        assert (await rank(client, user, candidates))["state_cache"] == "hit"

        # Newer events fold into the cached state (stale), then late events whose timestamps are
        # older than everything folded so far: they must get their own decay weight.
        newer = events_payload(user, 25, rng, start=500)
        older = events_payload(user, 15, rng, start=0)
        for payload in (newer, older):
            posted += payload["events"]
            assert (await client.post("/events", json=payload)).status_code == 200
            assert (await rank(client, user, candidates))["state_cache"] == "stale"

        final = await rank(client, user, candidates)
        assert (final["state_cache"], final["history_length"]) == ("hit", 80)
        assert_matches(final, from_scratch(model_dir, user, posted, candidates))

        # A retried batch changes nothing, to the bit.
        again = await client.post("/events", json=newer)
        assert again.json() == {"accepted": 0, "duplicates": 25}
        after_retry = await rank(client, user, candidates)
        assert after_retry["state_cache"] == "hit"
        assert after_retry["items"] == final["items"]


async def test_the_history_moves_scores_far_beyond_the_tolerance(model_dir: Path) -> None:
    """Guards the tests above: a model that ignored its history would pass them vacuously."""
    rng = np.random.default_rng(3)
    user, candidates = 8, list(range(0, 1000, 50))
    async with service_client(make_settings(model_dir)) as client:
        before = await rank(client, user, candidates)
        recent = events_payload(user, 20, rng, start=500)
        await client.post("/events", json=recent)
        after = await rank(client, user, candidates)
        old = events_payload(user, 40, rng, start=460)  # arrive late, a day or two older
        await client.post("/events", json=old)
        after_old = await rank(client, user, candidates)

    def scores(body: dict[str, Any]) -> np.ndarray:
        return np.array(sorted((i["item_id"], i["score"]) for i in body["items"]))[:, 1]

    assert np.abs(scores(after) - scores(before)).max() > 100 * TOLERANCE
    assert np.abs(scores(after_old) - scores(after)).max() > 100 * TOLERANCE


async def test_a_fresh_app_recomputes_the_same_state(model_dir: Path) -> None:
    """Two paths to one history: many small folds in one app, one miss in a cold one."""
    rng = np.random.default_rng(9)
    user, candidates = 5, list(range(0, 1000, 37))
    batches = [events_payload(user, 7, rng, start=i * 7) for i in range(6)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    async with service_client(make_settings(model_dir)) as client:
        for payload in batches:
            await client.post("/events", json=payload)
            await rank(client, user, candidates)
        folded = await rank(client, user, candidates)
    events = [e for payload in batches for e in payload["events"]]
    assert folded["history_length"] == 42
    assert_matches(folded, from_scratch(model_dir, user, events, candidates))


async def test_concurrent_posts_and_ranks_end_like_a_serial_run(
    model_dir: Path, store_settings: dict[str, Any]
) -> None:
    rng = np.random.default_rng(13)
    user, candidates = 77, [int(c) for c in rng.choice(1000, 40, replace=False)]
    batches = [events_payload(user, 6, rng, start=i * 6) for i in range(16)]
    retries = batches[::3]  # some batches are posted twice, concurrently with the first post

    async with service_client(make_settings(model_dir, **store_settings)) as client:
        calls = [client.post("/events", json=b) for b in [*batches, *retries]]
        calls += [
            client.post("/rank", json={"user_id": user, "candidate_ids": candidates})
            for _ in range(16)
        ]
        order = rng.permutation(len(calls))
        responses = await asyncio.gather(*(calls[i] for i in order))
        assert all(r.status_code == 200 for r in responses)
        posted = [r.json() for r in responses if "accepted" in r.json()]
        assert sum(p["accepted"] for p in posted) == 96
        assert sum(p["duplicates"] for p in posted) == 6 * len(retries)
        concurrent = await rank(client, user, candidates)

    async with service_client(make_settings(model_dir)) as client:
        for payload in batches:
            await client.post("/events", json=payload)
        serial = await rank(client, user, candidates)

    assert concurrent["history_length"] == serial["history_length"] == 96
    expected = {
        item["item_id"]: (
            item["score"],
            [item["probabilities"][name] for name in ACTIONS],
        )
        for item in serial["items"]
    }
    assert_matches(concurrent, expected)
    events = [e for payload in batches for e in payload["events"]]
    assert_matches(concurrent, from_scratch(model_dir, user, events, candidates))


async def test_concurrent_misses_of_one_user_encode_its_history_once(artifact_dir: Path) -> None:
    rng = np.random.default_rng(17)
    async with service_client(make_settings(artifact_dir)) as client:
        await client.post("/events", json=events_payload(90, 30, rng))
        responses = await asyncio.gather(
            *(rank(client, 90, list(range(10 * i, 10 * i + 10))) for i in range(8))
        )
        assert {r["history_length"] for r in responses} == {30}
        metrics = (await client.get("/metrics")).text
    assert 'ifa_rank_stage_duration_seconds_count{stage="encode"} 1.0' in metrics


async def test_with_the_state_cache_off_every_rank_recomputes_the_same_answer(
    artifact_dir: Path, store_settings: dict[str, Any]
) -> None:
    rng = np.random.default_rng(9)
    user, candidates = 7, [int(c) for c in rng.choice(1100, 30, replace=False)]
    batch = events_payload(user, 50, rng, start=0)
    settings = make_settings(artifact_dir, state_cache=False, **store_settings)
    async with service_client(settings) as client:
        assert (await client.post("/events", json=batch)).json()["accepted"] == 50
        bodies = [await rank(client, user, candidates) for _ in range(3)]
    # Three misses in a row: nothing was written back for the next request to hit.
    assert [b["state_cache"] for b in bodies] == ["miss", "miss", "miss"]
    assert all(b["history_length"] == 50 for b in bodies)
    assert bodies[1]["items"] == bodies[0]["items"] == bodies[2]["items"]
    assert_matches(bodies[0], from_scratch(artifact_dir, user, batch["events"], candidates))
