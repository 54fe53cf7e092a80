"""The live item catalogue: PUT /items, the item cache and its TTL, and what it means for scores
and states, on the in-process store, a real Redis and a real Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import model.catalogue as catalogue_module
from loadtest.harness import running_service
from model.artifact import load_artifact
from model.features import OOV_INDEX
from service.items import LiveCatalogue
from service.metrics import Metrics
from service.stores.base import Store
from service.stores.instrumented import InstrumentedStore
from service.stores.memory import MemoryStore
from service.stores.redis import RedisStore
from tests.support import (
    CATALOGUE_ITEMS,
    T0,
    make_settings,
    rank_all,
    scores_from_scratch,
    service_client,
)

pytestmark = pytest.mark.anyio
TOLERANCE = 1e-5
REQUEST_TIME = T0 + 86400.0
NEW_ITEM = CATALOGUE_ITEMS + 17
"""An id outside the test catalogue (0..999)."""
OTHERS = [3, 40, 512, 777]
"""Catalogue items ranked beside the item under test (scores depend on the whole set)."""


class Clock:
    """A clock the test moves: TTLs are checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def expected_scores(
    model_dir: Path,
    user_id: int,
    event_rows: np.ndarray,
    events: list[dict[str, Any]],
    candidate_rows: np.ndarray,
) -> np.ndarray:
    """(M,) scores from the exported programs: the history encoded from scratch with the given
    (N, F_item) item rows of its events, and the given (M, F_item) candidate rows."""
    scores, _ = scores_from_scratch(
        model_dir, user_id, events, event_rows, candidate_rows, REQUEST_TIME
    )
    return scores


def attribute_row(model_dir: Path, category: int, author: int, item_id: int = -1) -> np.ndarray:
    """(F_item,) row of an item with these raw attributes; the id OOV unless given."""
    spec = load_artifact(model_dir).spec
    columns = {
        n: np.array([v]) for n, v in zip(spec.item_names, (item_id, category, author), strict=True)
    }
    return spec.item_rows(columns)[0]


async def rank(client: httpx.AsyncClient, user_id: int, candidates: list[int]) -> dict[str, Any]:
    return await rank_all(client, user_id, candidates, REQUEST_TIME)


def scores_by_id(body: dict[str, Any]) -> dict[int, float]:
    return {item["item_id"]: item["score"] for item in body["items"]}


def event(event_id: str, user_id: int, item_id: int, hours: float) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "user_id": user_id,
        "item_id": item_id,
        "action": "click",
        "timestamp": T0 + 3600.0 * hours,
    }


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def two_stores(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The in-process store and a real Redis (a prefix of its own)."""
    if request.param == "memory":
        return {"store": "memory"}
    return {
        "store": "redis",
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_prefix": request.getfixturevalue("redis_prefix"),
    }


# -- PUT /items and /rank ------------------------------------------------------------------------


async def test_an_item_added_after_start_is_ranked_with_its_category_and_author(
    artifact_dir: Path, store_settings: dict[str, Any]
) -> None:
    candidates, history = [NEW_ITEM, *OTHERS], [event("h", 5, 20, 1)]
    async with service_client(make_settings(artifact_dir, **store_settings)) as client:
        assert (await client.post("/events", json={"events": history})).status_code == 200
        before = await rank(client, 5, candidates)
        assert before["unknown_items"] == 1
        put = await client.put(
            "/items", json={"items": [{"item_id": NEW_ITEM, "attributes": {"category": 3,
                                                                           "author": 21}}]}
        )  # fmt: skip
        assert put.status_code == 200, put.text
        assert put.json() == {
            "upserted": 1,
            "items": [{"item_id": NEW_ITEM, "oov_fields": [], "missing_fields": []}],
        }
        after = await rank(client, 5, candidates)
        metrics = (await client.get("/metrics")).text
    assert after["unknown_items"] == 0
    old, new = scores_by_id(before)[NEW_ITEM], scores_by_id(after)[NEW_ITEM]
    assert abs(new - old) > 1e-4  # its attributes count
    # ... exactly as a catalogue item with the same attributes and an OOV id would
    base = load_artifact(artifact_dir).catalogue
    rows = np.concatenate(
        [attribute_row(artifact_dir, 3, 21)[None], base.rows(np.array(OTHERS))[0]]
    )
    expected = expected_scores(artifact_dir, 5, base.rows(np.array([20]))[0], history, rows)
    assert new == pytest.approx(float(expected[0]), abs=TOLERANCE)
    assert 'ifa_unknown_items_total{reason="unknown_id"} 1.0' in metrics
    assert 'ifa_unknown_items_total{reason="unknown_attribute"} 0.0' in metrics


async def test_attributes_outside_the_vocabulary_are_oov_for_that_field_only(
    artifact_dir: Path, two_stores: dict[str, Any]
) -> None:
    # The test model has 8 categories; authors are hashed (any non-negative value is known).
    items = [
        {"item_id": NEW_ITEM, "attributes": {"category": 99, "author": 21}},
        {"item_id": NEW_ITEM + 1, "attributes": {"category": 2, "author": -4}},
        {"item_id": 12, "attributes": {"author": 30, "category": None}},  # a catalogue item
    ]
    candidates, history = [NEW_ITEM, NEW_ITEM + 1, 12, *OTHERS], [event("h", 6, 20, 1)]
    async with service_client(make_settings(artifact_dir, **two_stores)) as client:
        assert (await client.post("/events", json={"events": history})).status_code == 200
        put = await client.put("/items", json={"items": items})
        body = await rank(client, 6, candidates)
        metrics = (await client.get("/metrics")).text
    assert put.status_code == 200, put.text
    assert put.json()["items"] == [
        {"item_id": NEW_ITEM, "oov_fields": ["category"], "missing_fields": []},
        {"item_id": NEW_ITEM + 1, "oov_fields": ["author"], "missing_fields": []},
        {"item_id": 12, "oov_fields": [], "missing_fields": ["category"]},
    ]
    assert body["unknown_items"] == 0
    assert 'ifa_unknown_items_total{reason="unknown_attribute"} 3.0' in metrics
    base = load_artifact(artifact_dir).catalogue
    rows = np.stack(
        [
            attribute_row(artifact_dir, 99, 21),  # category OOV, author known
            attribute_row(artifact_dir, 2, -4),  # author OOV, category known
            attribute_row(artifact_dir, -1, 30, item_id=12),  # keeps its trained id
            *base.rows(np.array(OTHERS))[0],
        ]
    )
    assert rows[0, 1] == OOV_INDEX and rows[0, 2] != OOV_INDEX
    assert rows[1, 2] == OOV_INDEX and rows[1, 1] != OOV_INDEX
    expected = expected_scores(artifact_dir, 6, base.rows(np.array([20]))[0], history, rows)
    served = scores_by_id(body)
    assert [served[i] for i in candidates] == pytest.approx(expected.tolist(), abs=TOLERANCE)


async def test_bad_item_batches_are_refused_with_the_field_named(artifact_dir: Path) -> None:
    def one(**attributes: Any) -> dict[str, Any]:
        return {"items": [{"item_id": NEW_ITEM, "attributes": attributes}]}

    settings = make_settings(artifact_dir, max_items_per_put=3)
    async with service_client(settings) as client:
        unknown_name = await client.put("/items", json=one(colour=3, category=1))
        text = await client.put("/items", json=one(category="3"))
        too_big = await client.put("/items", json=one(author=2**63))
        twice = await client.put(
            "/items",
            json={
                "items": [
                    {"item_id": 1, "attributes": {}},
                    {"item_id": 1, "attributes": {"category": 1}},
                ]
            },
        )
        too_many = await client.put(
            "/items", json={"items": [{"item_id": i, "attributes": {}} for i in range(4)]}
        )
        no_attributes = await client.put("/items", json={"items": [{"item_id": 1}]})
        info = (await client.get("/model")).json()
        openapi = (await client.get("/openapi.json")).json()
    assert unknown_name.status_code == 422
    [issue] = unknown_name.json()["detail"]
    assert issue["field"] == "items[0].attributes.colour"
    assert "'colour'" in issue["msg"] and "['category', 'author']" in issue["msg"]
    assert text.status_code == 422
    assert text.json()["detail"][0]["field"].startswith("items[0].attributes.category")
    assert too_big.status_code == 422
    # An id given twice: written in order, so its last entry wins (a schema-valid body).
    assert twice.status_code == 200
    assert twice.json()["upserted"] == 1
    assert twice.json()["items"] == [{"item_id": 1, "oov_fields": [], "missing_fields": ["author"]}]
    assert too_many.status_code == 422 and "max_items_per_put" in too_many.text
    assert no_attributes.status_code == 422
    assert no_attributes.json()["detail"][0]["field"] == "items[0].attributes"
    assert info["limits"]["max_items_per_put"] == 3
    items_schema = openapi["components"]["schemas"]["ItemsRequest"]["properties"]["items"]
    assert items_schema["maxItems"] == 3
    # The document names the attributes the model has, and no other (as the 422 above).
    attributes = openapi["components"]["schemas"]["ItemIn"]["properties"]["attributes"]
    assert list(attributes["properties"]) == ["category", "author"]
    assert attributes["additionalProperties"] is False
    value = attributes["properties"]["author"]["anyOf"][0]
    assert (value["minimum"], value["maximum"]) == (-(2**63), 2**63 - 1)  # exact integers
    assert info["catalogue"] == {
        "base_items": CATALOGUE_ITEMS,
        "item_fields": ["category", "author"],
        "cache_ttl_seconds": 30.0,
        "updates_rewrite_states": False,
    }


async def test_put_items_requires_the_token_like_events(artifact_dir: Path) -> None:
    payload = {"items": [{"item_id": NEW_ITEM, "attributes": {"category": 1}}]}
    async with service_client(make_settings(artifact_dir, api_token="s3cret")) as client:
        missing = await client.put("/items", json=payload)
        wrong = await client.put("/items", json=payload, headers={"authorization": "Bearer x"})
        right = await client.put("/items", json=payload, headers={"authorization": "Bearer s3cret"})
    assert missing.status_code == 401 and wrong.status_code == 403
    assert right.status_code == 200


async def test_put_items_is_admitted_like_events(artifact_dir: Path) -> None:
    """The body limit covers PUT /items: a 413 before parsing, counted under its route."""
    big = {"items": [{"item_id": i, "attributes": {"category": 1}} for i in range(200)]}
    settings = make_settings(artifact_dir, max_body_bytes=1024)
    async with service_client(settings) as client:
        refused = await client.put("/items", json=big)
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 413
    assert "1024 bytes" in refused.text
    assert 'ifa_http_requests_total{method="PUT",route="/items",status_class="4xx"} 1.0' in metrics


# -- states: an event is folded with the features its item has when it is folded ----------------


@pytest.mark.parametrize("artifact", ["artifact_dir", "channel_artifact_dir"])
async def test_an_item_update_applies_to_events_folded_after_it(
    artifact: str, two_stores: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    """With the exact-match channel the category is also the event's one-hot slot in the
    state: the late event counts under the new category, the early one stays uncounted."""
    artifact_dir = request.getfixturevalue(artifact)
    user, candidates = 8, [NEW_ITEM, *OTHERS]
    early = [event("a", user, NEW_ITEM, 1), event("b", user, 20, 2)]
    late = [event("c", user, NEW_ITEM, 3)]
    async with service_client(make_settings(artifact_dir, **two_stores)) as client:
        assert (await client.post("/events", json={"events": early})).status_code == 200
        folded = await rank(client, user, candidates)  # the early events, NEW_ITEM unknown
        await client.put(
            "/items", json={"items": [{"item_id": NEW_ITEM, "attributes": {"category": 5,
                                                                           "author": 9}}]}
        )  # fmt: skip
        kept = await rank(client, user, candidates)
        assert (await client.post("/events", json={"events": late})).status_code == 200
        refolded = await rank(client, user, candidates)
    assert (folded["state_cache"], kept["state_cache"]) == ("miss", "hit")
    assert refolded["state_cache"] == "stale"
    base = load_artifact(artifact_dir).catalogue
    known = attribute_row(artifact_dir, 5, 9)
    unknown = np.full(3, OOV_INDEX)
    other_rows = base.rows(np.array(OTHERS))[0]
    event_rows_then = np.stack([unknown, base.rows(np.array([20]))[0][0]])
    # The state cached before the update is not rewritten: only the candidate row changed.
    expected_kept = expected_scores(
        artifact_dir, user, event_rows_then, early, np.vstack([known, other_rows])
    )
    served = scores_by_id(kept)
    assert [served[i] for i in candidates] == pytest.approx(expected_kept.tolist(), abs=TOLERANCE)
    # The event folded after the update has the item's new features; the earlier one keeps its.
    expected_late = expected_scores(
        artifact_dir,
        user,
        np.vstack([event_rows_then, known]),
        early + late,
        np.vstack([known, other_rows]),
    )
    served = scores_by_id(refolded)
    assert [served[i] for i in candidates] == pytest.approx(expected_late.tolist(), abs=TOLERANCE)


# -- the item cache --------------------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def item_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    store = RedisStore(
        request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix")
    )
    try:
        yield store
    finally:
        await store.close()


def live_catalogue(
    artifact_dir: Path, store: Store, clock: Clock, ttl: float = 10.0, capacity: int = 100
) -> tuple[LiveCatalogue, Metrics]:
    metrics = Metrics()
    catalogue = LiveCatalogue(
        load_artifact(artifact_dir).catalogue,
        InstrumentedStore(store, metrics),
        metrics,
        ttl_seconds=ttl,
        capacity=capacity,
        lookup_budget_seconds=5.0,
        clock=clock,
    )
    return catalogue, metrics


def counts(metrics: Metrics) -> dict[str, float]:
    """Item cache outcomes and store lookups so far."""
    sample = metrics.registry.get_sample_value
    found = {
        outcome: sample("ifa_item_cache_total", {"outcome": outcome})
        for outcome in ("hit", "miss", "degraded")
    }
    found["lookups"] = sample(
        "ifa_store_operation_duration_seconds_count", {"operation": "get_items"}
    )
    return {name: value or 0.0 for name, value in found.items()}


async def test_the_cache_honours_an_update_within_its_ttl(
    artifact_dir: Path, item_store: Store
) -> None:
    """Two workers over one store: the one that did not take the update ranks with the item's
    old features until its entry expires, and with the new ones from then on."""
    clock = Clock()
    writer, _ = live_catalogue(artifact_dir, item_store, Clock())
    reader, metrics = live_catalogue(artifact_dir, item_store, clock, ttl=10.0)
    ids = np.array([7, NEW_ITEM])
    await writer.put({7: {"category": 1, "author": 2}})
    first = await reader.rows(ids)
    assert first.known.tolist() == [True, False]
    await writer.put({7: {"category": 4, "author": 2}, NEW_ITEM: {"category": 6, "author": 3}})
    clock.now += 9.9
    cached = await reader.rows(ids)
    assert (cached.rows == first.rows).all() and cached.known.tolist() == [True, False]
    clock.now += 0.2  # 10.1 s after the lookup: both entries expired
    fresh = await reader.rows(ids)
    assert fresh.known.tolist() == [True, True]
    assert (fresh.rows[0] == attribute_row(artifact_dir, 4, 2, item_id=7)).all()
    assert (fresh.rows[1] == attribute_row(artifact_dir, 6, 3)).all()
    assert counts(metrics) == {"hit": 2, "miss": 4, "degraded": 0, "lookups": 2}
    # The writer's own cache took the update at once.
    assert ((await writer.rows(ids)).rows == fresh.rows).all()


async def test_catalogue_items_cost_one_lookup_per_ttl_not_one_per_request(
    artifact_dir: Path, item_store: Store
) -> None:
    clock = Clock()
    catalogue, metrics = live_catalogue(artifact_dir, item_store, clock, ttl=10.0)
    base = load_artifact(artifact_dir).catalogue
    ids = np.arange(0, CATALOGUE_ITEMS, 3)
    for _ in range(5):
        found = await catalogue.rows(ids)
        assert (found.rows == base.rows(ids)[0]).all() and found.known.all()
        clock.now += 1.0
    assert counts(metrics) == {"hit": 4 * ids.size, "miss": ids.size, "degraded": 0, "lookups": 1}
    clock.now += 10.0
    await catalogue.rows(ids)
    assert counts(metrics)["lookups"] == 2


async def test_unknown_ids_are_cached_too_and_the_cache_is_bounded(
    artifact_dir: Path, item_store: Store
) -> None:
    clock = Clock()
    catalogue, metrics = live_catalogue(artifact_dir, item_store, clock, capacity=50)
    unknown = np.arange(10**9, 10**9 + 40)
    for _ in range(3):
        found = await catalogue.rows(unknown)
        assert not found.known.any() and (found.rows == OOV_INDEX).all()
    assert counts(metrics)["lookups"] == 1
    await catalogue.rows(np.arange(2 * 10**9, 2 * 10**9 + 200))
    assert len(catalogue._others) == 50


async def test_the_table_by_id_locates_catalogue_ids_as_the_binary_search_does(
    artifact_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense, _ = live_catalogue(artifact_dir, MemoryStore(), Clock())
    monkeypatch.setattr(catalogue_module, "DENSE_SPAN_PER_ITEM", -1)  # every one too sparse
    sparse, _ = live_catalogue(artifact_dir, MemoryStore(), Clock())
    assert dense.base._position_by_offset is not None
    assert sparse.base._position_by_offset is None
    ids = np.array([0, 1, CATALOGUE_ITEMS - 1, CATALOGUE_ITEMS, 5, 5, 10**12, 2**62, 2**63 - 1])
    (dense_position, dense_in), (sparse_position, sparse_in) = (
        catalogue._base_positions(ids) for catalogue in (dense, sparse)
    )
    assert (
        dense_in.tolist()
        == sparse_in.tolist()
        == [True] * 3 + [False, True, True, False, False, False]
    )
    assert (dense_position[dense_in] == sparse_position[sparse_in]).all()
    assert (dense._base_ids[dense_position[dense_in]] == ids[dense_in]).all()
    found = [await catalogue.rows(ids) for catalogue in (dense, sparse)]
    assert (found[0].rows == found[1].rows).all() and (found[0].known == found[1].known).all()


async def test_one_request_mixing_catalogue_new_and_unknown_ids_with_repeats(
    artifact_dir: Path, item_store: Store
) -> None:
    """Each kind of id answered from its cache, repeats included, until its entry expires."""
    clock = Clock()
    catalogue, metrics = live_catalogue(artifact_dir, item_store, clock, ttl=10.0)
    await catalogue.put({NEW_ITEM: {"category": 3, "author": 5}})
    unknown = 10**9 + 1
    ids = np.array([NEW_ITEM, 5, unknown, 5, NEW_ITEM, unknown, 7])
    base = load_artifact(artifact_dir).catalogue
    expected = np.stack(
        [attribute_row(artifact_dir, 3, 5), *base.rows(np.array([5]))[0], np.full(3, OOV_INDEX)]
    )[[0, 1, 2, 1, 0, 2]]
    first = await catalogue.rows(ids)
    assert first.known.tolist() == [True, True, False, True, True, False, True]
    assert (first.rows[:6] == expected).all()
    assert (first.rows[6] == base.rows(np.array([7]))[0][0]).all()
    # The PUT's entry answers both of its positions; the others are fetched in one lookup.
    assert counts(metrics) == {"hit": 2, "miss": 5, "degraded": 0, "lookups": 1}
    clock.now += 9.9
    again = await catalogue.rows(ids)
    assert (again.rows == first.rows).all() and (again.known == first.known).all()
    assert counts(metrics) == {"hit": 9, "miss": 5, "degraded": 0, "lookups": 1}
    clock.now += 0.2  # every entry expired: all seven positions are looked up again
    expired = await catalogue.rows(ids)
    assert (expired.rows == first.rows).all()
    assert counts(metrics) == {"hit": 9, "miss": 12, "degraded": 0, "lookups": 2}


@pytest.mark.redis
async def test_an_unreachable_item_table_degrades_to_what_the_worker_knows(
    artifact_dir: Path, redis_url: str, redis_prefix: str
) -> None:
    clock = Clock()
    good = RedisStore(redis_url, prefix=redis_prefix)
    gone = RedisStore("redis://127.0.0.1:1/0", timeout_seconds=0.05, retries=0)
    try:
        writer, _ = live_catalogue(artifact_dir, good, Clock())
        await writer.put({NEW_ITEM: {"category": 2, "author": 1}})
        catalogue, metrics = live_catalogue(artifact_dir, good, clock, ttl=1.0)
        ids = np.array([NEW_ITEM, 5, NEW_ITEM + 1])
        known = await catalogue.rows(ids)
        catalogue.table = gone  # the store goes away
        clock.now += 5.0  # every entry expired
        degraded = await catalogue.rows(np.concatenate([ids, [6]]))
    finally:
        await good.close()
        await gone.close()
    # Expired entries still answer; an id never seen gets its base row.
    assert (degraded.rows[:3] == known.rows).all()
    assert degraded.known.tolist() == [True, True, False, True]
    base = load_artifact(artifact_dir).catalogue
    assert (degraded.rows[3] == base.rows(np.array([6]))[0][0]).all()
    assert counts(metrics)["degraded"] == 4


# -- a real process --------------------------------------------------------------------------------


@pytest.fixture
def server(artifact_dir: Path, redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[str]:
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_URL": redis_url,
        "IFA_REDIS_PREFIX": redis_prefix,
        "IFA_API_TOKEN": "e2e-token",
        "IFA_LOG_LEVEL": "warning",
    }
    with running_service(artifact_dir, tmp_path / "service.log", env=env, timeout=60) as service:
        yield service.url


@pytest.mark.e2e
@pytest.mark.redis
def test_a_served_process_takes_items_and_ranks_with_them(server: str) -> None:
    candidates = [NEW_ITEM, *OTHERS]
    request = {"user_id": 3, "candidate_ids": candidates, "k": 5, "request_time": REQUEST_TIME}
    token = {"authorization": "Bearer e2e-token"}
    items = {"items": [{"item_id": NEW_ITEM, "attributes": {"category": 3, "author": 21}}]}
    with httpx.Client(base_url=server, timeout=10) as client:
        before = client.post("/rank", json=request).json()
        assert client.put("/items", json=items).status_code == 401
        put = client.put("/items", json=items, headers=token)
        assert put.status_code == 200, put.text
        after = client.post("/rank", json=request).json()
        metrics = client.get("/metrics").text
    assert (before["unknown_items"], after["unknown_items"]) == (1, 0)
    assert scores_by_id(before)[NEW_ITEM] != scores_by_id(after)[NEW_ITEM]
    assert 'ifa_unknown_items_total{reason="unknown_id"} 1.0' in metrics
    assert 'ifa_item_cache_total{outcome="miss"}' in metrics
