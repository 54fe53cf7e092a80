"""Wrong cached states are replaced, never kept; the history cap keeps each state exactly the
state of its window (the most recent max_history events), with and without time decay, on both
stores; the served score then equals the training network's forward on that window."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.artifact import CHECKPOINT_FILE, resolve_artifact_dir
from model.batch import Batch
from model.catalogue import Catalogue
from model.checkpoint import load_checkpoint
from service.api.deps import Services
from service.ranker import REENCODE_AFTER_WINDOWS
from service.state import UserState, advance, decode_state, encode_state
from service.stores.records import EventLog
from tests.service.test_consistency import (
    ACTIONS,
    REQUEST_TIME,
    TOLERANCE,
    assert_matches,
    from_scratch,
    rank,
)
from tests.support import events_payload, make_settings, service_client

pytestmark = pytest.mark.anyio
WINDOW = 8


def services_of(client: Any) -> Services:
    services = client.app.state.services
    assert isinstance(services, Services)
    return services


async def cached_state(services: Services, user_id: int) -> UserState:
    runtime = services.runtime
    snapshot = await services.store.snapshot(runtime.state_version, user_id, 3600)
    assert snapshot.state is not None
    return decode_state(snapshot.state, runtime.heads, runtime.key_dim, runtime.value_dim)


def log_of(events: list[dict[str, Any]], end: int) -> EventLog:
    order = np.argsort([e["timestamp"] for e in events], kind="stable")
    return EventLog(
        item_ids=np.array([events[i]["item_id"] for i in order], dtype=np.int64),
        actions=np.array([ACTIONS.index(events[i]["action"]) for i in order], dtype=np.int64),
        timestamps=np.array([events[i]["timestamp"] for i in order], dtype=np.float64),
        end=end,
        positions=end - len(events) + order.astype(np.int64),
    )


def assert_same_state(got: UserState, want: UserState) -> None:
    """Equal as states (discounted to one time by the caller: a fold-out keeps the reference time
    of the events folded out), compared relative to their scale as the exporter does."""
    for a, b in ((got.s, want.s), (got.z, want.z)):
        scale = float(b.abs().max().clamp(min=1.0))
        assert float((a - b).abs().max()) / scale <= TOLERANCE, (a - b).abs().max()
    assert (got.start, got.cursor) == (want.start, want.cursor)


# -- repairs -----------------------------------------------------------------------------------


async def _posted_user(client: Any, user_id: int, n: int = 3) -> tuple[dict[str, Any], list[int]]:
    rng = np.random.default_rng(user_id)
    payload = events_payload(user_id, n, rng)
    assert (await client.post("/events", json=payload)).status_code == 200
    candidates = [1, 2, 3, 500, 1100]
    return payload, candidates


def _garbage(good: UserState) -> bytes:
    return b"\x01" * 40


def _truncated(good: UserState) -> bytes:
    return encode_state(good)[:-4]


def _nan(good: UserState) -> bytes:
    return encode_state(replace(good, s=good.s * float("nan")))


def _beyond_the_log(good: UserState) -> bytes:
    """What a restored or truncated log leaves behind: a state that claims more events."""
    return encode_state(replace(good, s=good.s * 2, z=good.z * 2, cursor=good.cursor + 5))


@pytest.mark.parametrize(
    ("reason", "blob_of"),
    [
        ("undecodable", _garbage),
        ("undecodable", _truncated),
        ("non_finite", _nan),
        ("cursor_beyond_log", _beyond_the_log),
    ],
    ids=["garbage", "truncated", "nan", "cursor-beyond-log"],
)
async def test_a_wrong_cached_state_is_replaced(
    artifact_dir: Path, store_settings: dict[str, Any], reason: str, blob_of: Any
) -> None:
    async with service_client(make_settings(artifact_dir, **store_settings)) as client:
        services = services_of(client)
        _, candidates = await _posted_user(client, 4)
        good = await rank(client, 4, candidates)
        await services.ranker.drain(5)  # the write-back runs after the answer
        good_state = await cached_state(services, 4)
        # Written over the good entry, with a cursor that would win any compare-and-set.
        bad = blob_of(good_state)
        await services.store.put_state(services.runtime.state_version, 4, bad, 99, 60, True)

        again = await rank(client, 4, candidates)
        assert again["state_cache"] == "miss"
        assert again["items"] == good["items"]
        await services.ranker.drain(5)
        # Replaced in the store (not kept because its cursor was larger): the next is a hit.
        assert (await cached_state(services, 4)).cursor == good_state.cursor
        assert (await rank(client, 4, candidates))["state_cache"] == "hit"
        metrics = (await client.get("/metrics")).text
        assert f'ifa_state_repairs_total{{reason="{reason}"}} 1.0' in metrics


async def test_a_state_whose_evicted_events_are_gone_is_rebuilt(
    artifact_dir: Path, store_settings: dict[str, Any]
) -> None:
    settings = make_settings(artifact_dir, max_history=WINDOW, **store_settings)
    rng = np.random.default_rng(3)
    async with service_client(settings) as client:
        services = services_of(client)
        first = events_payload(9, WINDOW, rng)
        await client.post("/events", json=first)
        candidates = [1, 2, 3]
        assert (await rank(client, 9, candidates))["state_cache"] == "miss"
        await services.ranker.drain(5)
        # 2·WINDOW more events: the log is cut past the cached state's first event.
        later = events_payload(9, 2 * WINDOW, rng, start=WINDOW)
        await client.post("/events", json=later)
        assert (await services.store.snapshot("x", 9, 60)).log_start > 0
        body = await rank(client, 9, candidates)
        assert (body["state_cache"], body["history_length"]) == ("miss", WINDOW)
        assert_matches(body, from_scratch(artifact_dir, 9, later["events"][-WINDOW:], candidates))
        metrics = (await client.get("/metrics")).text
        assert 'ifa_state_repairs_total{reason="window_unreachable"} 1.0' in metrics


# -- the history cap ---------------------------------------------------------------------------


async def test_the_trimmed_state_equals_the_kept_window_from_scratch(
    model_dir: Path, store_settings: dict[str, Any]
) -> None:
    rng = np.random.default_rng(11)
    user, candidates = 21, [int(c) for c in rng.choice(1100, 40, replace=False)]
    posted: list[dict[str, Any]] = []
    settings = make_settings(model_dir, max_history=WINDOW, **store_settings)
    async with service_client(settings) as client:
        services = services_of(client)
        assert (await client.get("/model")).json()["limits"]["max_history"] == WINDOW
        # Batches of 2 (a quarter window: the most a cached state may lag and still fold out), a
        # rank after each: the state is folded in and out (and the log cut, more than once),
        # never rebuilt. The last batch is older than everything: the window is by arrival, not
        # by timestamp.
        for i, start in enumerate([*range(100, 130, 2), 0]):
            batch = events_payload(user, 2, rng, start=start)
            posted += batch["events"]
            assert (await client.post("/events", json=batch)).status_code == 200
            body = await rank(client, user, candidates)
            assert body["state_cache"] == ("miss" if i == 0 else "stale")
            assert body["history_length"] == min(len(posted), WINDOW)
            await services.ranker.drain(5)

        kept = posted[-WINDOW:]
        assert_matches(body, from_scratch(model_dir, user, kept, candidates))
        runtime = services.runtime
        scratch = runtime.encode_history(log_of(kept, len(posted)), len(posted) - WINDOW)
        trimmed = await cached_state(services, user)
        when = max(trimmed.reference_time, scratch.reference_time)
        assert_same_state(
            advance(trimmed, when, runtime.decay_rates), advance(scratch, when, runtime.decay_rates)
        )
        # The log itself is bounded: fewer than 2·WINDOW records, none before the window's
        # predecessors were dropped.
        stored = await services.store.read_events(user, 0)
        assert stored.end == len(posted)
        assert len(stored) < 2 * WINDOW
        assert int(stored.positions.min()) == len(posted) - len(stored)


async def test_the_served_score_equals_the_training_forward_on_the_window(
    model_dir: Path, store_settings: dict[str, Any]
) -> None:
    """Training and serving see the same history: the most recent max_history events."""
    rng = np.random.default_rng(13)
    user, candidates = 31, [int(c) for c in rng.choice(1000, 30, replace=False)]
    settings = make_settings(model_dir, max_history=WINDOW, **store_settings)
    posted: list[dict[str, Any]] = []
    async with service_client(settings) as client:
        for start in (0, 7, 14):
            batch = events_payload(user, 7, rng, start=start)
            posted += batch["events"]
            await client.post("/events", json=batch)
            body = await rank(client, user, candidates)
    assert body["history_length"] == WINDOW

    checkpoint = load_checkpoint(resolve_artifact_dir(model_dir) / CHECKPOINT_FILE)
    net, spec = checkpoint.net, checkpoint.spec
    catalogue = Catalogue.load(resolve_artifact_dir(model_dir) / "catalogue.parquet", spec)
    window = sorted(posted[-WINDOW:], key=lambda e: e["timestamp"])  # oldest first
    item_rows, _ = catalogue.rows(np.array([e["item_id"] for e in window], dtype=np.int64))
    times = np.array([e["timestamp"] for e in window], dtype=np.float64)
    actions = np.array([ACTIONS.index(e["action"]) for e in window], dtype=np.int64)
    events = spec.event_rows(item_rows, actions, times)
    candidate_rows, _ = catalogue.rows(np.array(candidates, dtype=np.int64))
    inputs = Batch(
        user=torch.from_numpy(spec.user_rows({"user_id": np.array([user])})),
        candidates=torch.from_numpy(candidate_rows)[None],
        candidate_mask=torch.ones(1, len(candidates), dtype=torch.bool),
        events=torch.from_numpy(events)[None],
        event_mask=torch.ones(1, len(window), dtype=torch.bool),
        event_times=torch.from_numpy(times)[None],
        request_time=torch.tensor([REQUEST_TIME], dtype=torch.float64),
    )
    with torch.no_grad():
        probabilities = torch.sigmoid(net(inputs))[0].numpy()
    served = {item["item_id"]: item for item in body["items"]}
    for i, item_id in enumerate(candidates):
        got = [served[item_id]["probabilities"][name] for name in ACTIONS]
        np.testing.assert_allclose(got, probabilities[i], atol=TOLERANCE, rtol=0)


async def test_a_long_folding_state_is_encoded_afresh_now_and_then(
    decay_artifact_dir: Path,
) -> None:
    """Folds round in float32: after REENCODE_AFTER_WINDOWS windows of evictions the state is
    encoded from scratch (a miss), so rounding cannot accumulate for ever."""
    window = 8  # batches of 2 fold out while the log keeps a quarter window more (10 records)
    settings = make_settings(decay_artifact_dir, max_history=window)
    rng = np.random.default_rng(17)
    posted: list[dict[str, Any]] = []
    outcomes = []
    candidates = [1, 2, 3, 4]
    async with service_client(settings) as client:
        services = services_of(client)
        for start in range(0, 2 * REENCODE_AFTER_WINDOWS * window + 4, 2):
            batch = events_payload(5, 2, rng, start=start)
            posted += batch["events"]
            await client.post("/events", json=batch)
            outcomes.append((await rank(client, 5, candidates))["state_cache"])
            await services.ranker.drain(5)
        state = await cached_state(services, 5)
        assert_matches(
            await rank(client, 5, candidates),
            from_scratch(decay_artifact_dir, 5, posted[-window:], candidates),
        )
    # The first rank encodes; then folds, until 4 windows were folded out since the anchor.
    first_refresh = 1 + outcomes[1:].index("miss")
    assert set(outcomes[1:first_refresh]) == {"stale"}
    evicted_then = 2 * (first_refresh + 1) - window
    assert evicted_then >= REENCODE_AFTER_WINDOWS * window > evicted_then - 2
    assert 0 < state.anchor <= state.start
