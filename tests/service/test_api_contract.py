"""The wire contract of DESIGN §5, in-process over httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    CATALOGUE_ITEMS,
    T0,
    events_payload,
    make_settings,
    service_client,
)

pytestmark = pytest.mark.anyio

MAX_CANDIDATES = 64
MAX_EVENTS = 5


@pytest.fixture
async def client(artifact_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        artifact_dir, max_candidates=MAX_CANDIDATES, max_events_per_post=MAX_EVENTS, default_k=7
    )
    async with service_client(settings) as client:
        yield client


def issue_fields(response: httpx.Response) -> list[str]:
    return [issue["field"] for issue in response.json()["detail"]]


async def test_rank_happy_path(client: httpx.AsyncClient) -> None:
    candidates = list(range(100, 140))
    response = await client.post("/rank", json={"user_id": 7, "candidate_ids": candidates, "k": 10})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    info = (await client.get("/model")).json()
    assert body["model_version"] == info["version"]
    items = body["items"]
    assert len(items) == 10
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    assert {item["item_id"] for item in items} <= set(candidates)
    for item in items:
        p = item["probabilities"]
        assert set(p) == {"impression", "click", "long_view", "like"}
        assert all(0.0 <= v <= 1.0 for v in p.values())
        # Default fusion: p(impression) · p(click | impression).
        assert item["score"] == pytest.approx(p["impression"] * p["click"], rel=1e-5)
    assert body["unknown_items"] == 0
    assert body["history_length"] == 0


async def test_k_larger_than_the_set_returns_every_candidate(client: httpx.AsyncClient) -> None:
    response = await client.post("/rank", json={"user_id": 1, "candidate_ids": [5, 6, 7], "k": 50})
    assert response.status_code == 200
    assert sorted(item["item_id"] for item in response.json()["items"]) == [5, 6, 7]


async def test_k_defaults_to_the_setting(client: httpx.AsyncClient) -> None:
    response = await client.post("/rank", json={"user_id": 1, "candidate_ids": list(range(20))})
    assert len(response.json()["items"]) == 7


async def test_the_set_is_scored_as_a_whole_and_top_k_is_its_prefix(
    client: httpx.AsyncClient,
) -> None:
    body = {"user_id": 3, "candidate_ids": list(range(30)), "request_time": T0}
    everything = (await client.post("/rank", json={**body, "k": 30})).json()["items"]
    top = (await client.post("/rank", json={**body, "k": 5})).json()["items"]
    assert top == everything[:5]


MAX_ID = 2**63 - 1


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({"user_id": 1, "candidate_ids": [1, 2, 2, 3, 3]}, "candidate_ids", "[2, 3]"),
        ({"user_id": 1, "candidate_ids": []}, "candidate_ids", "at least 1"),
        ({"user_id": 1, "candidate_ids": [4, -1]}, "candidate_ids[1]", "greater than or equal"),
        ({"user_id": 1, "candidate_ids": [1.5]}, "candidate_ids[0]", "valid integer"),
        ({"user_id": 1, "candidate_ids": [3.5]}, "candidate_ids[0]", "valid integer"),
        ({"user_id": 1, "candidate_ids": ["7"]}, "candidate_ids[0]", "valid integer"),
        ({"user_id": 1, "candidate_ids": [True]}, "candidate_ids[0]", "valid integer"),
        ({"user_id": 1, "candidate_ids": [MAX_ID + 1]}, "candidate_ids[0]", str(MAX_ID)),
        ({"user_id": 1, "candidate_ids": list(range(65))}, "candidate_ids", "at most 64"),
        ({"user_id": -3, "candidate_ids": [1]}, "user_id", "greater than or equal"),
        ({"user_id": MAX_ID + 1, "candidate_ids": [1]}, "user_id", str(MAX_ID)),
        ({"user_id": "7", "candidate_ids": [1]}, "user_id", "valid integer"),
        ({"user_id": False, "candidate_ids": [1]}, "user_id", "valid integer"),
        ({"candidate_ids": [1]}, "user_id", "required"),
        ({"user_id": 1}, "candidate_ids", "required"),
        ({"user_id": 1, "candidate_ids": [1], "k": 0}, "k", "greater than or equal to 1"),
        ({"user_id": 1, "candidate_ids": [1], "k": 2.5}, "k", "valid integer"),
        ({"user_id": 1, "candidates": [1]}, "candidates", "not permitted"),
        ({"user_id": 1, "candidate_ids": [1], "request_time": 1.7e12}, "request_time", "less"),
    ],
)
async def test_rank_rejects_invalid_bodies_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str, needle: str
) -> None:
    response = await client.post("/rank", json=body)
    assert response.status_code == 422, response.text
    issues = response.json()["detail"]
    match = [i for i in issues if i["field"] == field]
    assert match, f"no issue names {field}: {issues}"
    assert match[0]["msg"].startswith(f"{field}: ")
    assert needle in match[0]["msg"]
    assert match[0]["loc"][0] == "body"


async def test_the_max_id_itself_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/rank", json={"user_id": MAX_ID, "candidate_ids": [MAX_ID, 0]})
    assert response.status_code == 200
    assert response.json()["unknown_items"] == 1


@pytest.mark.parametrize(
    "content", [b'{"user_id": 1, "candidate_ids": [1,', b"not json", b'{"user_id": 1 2}']
)
async def test_malformed_json_is_a_400_that_says_so(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post(
        "/rank", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    (issue,) = response.json()["detail"]
    assert issue["field"] == "body"
    assert "malformed JSON" in issue["msg"]


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"null", b"17"])
async def test_a_body_that_is_not_an_object_is_a_422(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post(
        "/rank", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"]


async def test_a_body_that_is_not_json_says_which_content_type_to_use(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/rank",
        content=b'{"user_id": 1, "candidate_ids": [1]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 422
    assert "application/json" in response.json()["detail"][0]["msg"]


async def test_unknown_user_is_scored_with_an_empty_history(client: httpx.AsyncClient) -> None:
    response = await client.post("/rank", json={"user_id": 987654321, "candidate_ids": [1, 2]})
    assert response.status_code == 200
    assert response.json()["history_length"] == 0
    assert len(response.json()["items"]) == 2


async def test_unknown_items_are_still_ranked_and_counted(client: httpx.AsyncClient) -> None:
    unknown = [CATALOGUE_ITEMS + 5, 10**15, MAX_ID]
    response = await client.post(
        "/rank", json={"user_id": 1, "candidate_ids": [1, *unknown, 2], "k": 10}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["unknown_items"] == 3
    assert sorted(item["item_id"] for item in body["items"]) == sorted([1, 2, *unknown])
    metrics = (await client.get("/metrics")).text
    assert 'ifa_unknown_items_total{reason="unknown_id"} 3.0' in metrics
    assert 'ifa_unknown_items_total{reason="unknown_attribute"} 0.0' in metrics
    assert "ifa_candidates_total 5.0" in metrics


async def test_events_are_accepted_then_duplicates(client: httpx.AsyncClient) -> None:
    payload = events_payload(11, 4, np.random.default_rng(0))
    first = await client.post("/events", json=payload)
    assert first.status_code == 200
    assert first.json() == {"accepted": 4, "duplicates": 0}
    again = await client.post("/events", json=payload)
    assert again.json() == {"accepted": 0, "duplicates": 4}
    ranked = await client.post("/rank", json={"user_id": 11, "candidate_ids": [1, 2]})
    assert ranked.json()["history_length"] == 4


async def test_unknown_actions_are_a_422_naming_each_event(client: httpx.AsyncClient) -> None:
    payload = events_payload(12, 3, np.random.default_rng(1))
    payload["events"][1]["action"] = "purchase"
    payload["events"][2]["action"] = "CLICK"
    response = await client.post("/events", json=payload)
    assert response.status_code == 422
    assert issue_fields(response) == ["events[1].action", "events[2].action"]
    assert "'purchase'" in response.json()["detail"][0]["msg"]
    assert "click" in response.json()["detail"][0]["msg"]
    # Nothing of a rejected batch is stored.
    ranked = await client.post("/rank", json={"user_id": 12, "candidate_ids": [1]})
    assert ranked.json()["history_length"] == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": 1.7e12}, "events[0].timestamp"),
        ({"timestamp": "1700000000"}, "events[0].timestamp"),
        ({"event_id": ""}, "events[0].event_id"),
        ({"event_id": 17}, "events[0].event_id"),
        ({"item_id": -1}, "events[0].item_id"),
        ({"user_id": 2**63}, "events[0].user_id"),
        ({"action": None}, "events[0].action"),
    ],
)
async def test_invalid_events_name_the_field(
    client: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    payload = events_payload(13, 1, np.random.default_rng(2))
    payload["events"][0].update(change)
    response = await client.post("/events", json=payload)
    assert response.status_code == 422
    assert field in issue_fields(response)


async def test_too_many_or_no_events_are_refused(client: httpx.AsyncClient) -> None:
    many = events_payload(14, MAX_EVENTS + 1, np.random.default_rng(3))
    response = await client.post("/events", json=many)
    assert response.status_code == 422
    assert issue_fields(response) == ["events"]
    assert f"at most {MAX_EVENTS}" in response.json()["detail"][0]["msg"]
    empty = await client.post("/events", json={"events": []})
    assert empty.status_code == 422
    assert issue_fields(empty) == ["events"]


async def test_health_readiness_and_model_info(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    info = (await client.get("/model")).json()
    assert ready.json()["model_version"] == info["version"]
    assert info["actions"] == ["impression", "click", "long_view", "like"]
    assert info["objectives"] == ["impression", "click", "long_view", "like"]
    assert info["limits"]["max_candidates"] == MAX_CANDIDATES
    assert info["limits"]["max_events_per_post"] == MAX_EVENTS
    assert info["state_bytes"] <= 16 * 1024
    assert info["store"] == "memory"


async def test_openapi_documents_fields_limits_and_errors(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    rank_request = components["RankRequest"]["properties"]
    assert rank_request["candidate_ids"]["maxItems"] == MAX_CANDIDATES
    assert rank_request["candidate_ids"]["items"]["maximum"] == MAX_ID
    assert components["EventsRequest"]["properties"]["events"]["maxItems"] == MAX_EVENTS
    assert components["EventIn"]["properties"]["action"]["enum"] == [
        "impression", "click", "long_view", "like",
    ]  # fmt: skip
    ours = [name for name in components if name not in ("HTTPValidationError", "ValidationError")]
    assert {"RankRequest", "EventIn", "RankResponse", "ModelInfo", "ErrorResponse"} <= set(ours)
    for name in ours:
        for prop, spec in components[name]["properties"].items():
            assert spec.get("description"), f"{name}.{prop} is undocumented"
    rank_responses = schema["paths"]["/rank"]["post"]["responses"]
    assert {"200", "400", "422", "503"} <= set(rank_responses)
    assert {"200", "400", "422", "503"} <= set(schema["paths"]["/events"]["post"]["responses"])
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]


async def test_metrics_count_requests_by_route_template(client: httpx.AsyncClient) -> None:
    await client.post("/rank", json={"user_id": 1, "candidate_ids": [1, 2, 3]})
    await client.post("/rank", json={"user_id": 1, "candidate_ids": []})
    await client.get("/no/such/route")
    await client.get("/metrics")
    text = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    rank_ok = {"route": "/rank", "method": "POST"}
    assert value("ifa_http_requests_total", **rank_ok, status_class="2xx") == 1
    assert value("ifa_http_requests_total", **rank_ok, status_class="4xx") == 1
    assert value("ifa_http_requests_total", route="other", method="GET", status_class="4xx") == 1
    assert value("ifa_http_request_duration_seconds_count", **rank_ok) == 2
    assert value("ifa_http_requests_total", route="/metrics", method="GET", status_class="2xx") >= 1
    assert ("ifa_http_request_duration_seconds_count", (("method", "GET"), ("route", "/metrics"))) \
        not in samples  # fmt: skip
    assert value("ifa_errors_total", kind="validation") == 1
    assert value("ifa_state_cache_total", outcome="miss") == 1
    assert value("ifa_rank_candidates_count") == 1
    for stage in ("validate", "featurize", "state_fetch", "forward", "serialise"):
        assert value("ifa_rank_stage_duration_seconds_count", stage=stage) >= 1, stage
    info = (await client.get("/model")).json()
    assert value("ifa_model_info", version=info["version"]) == 1
    assert value("ifa_store_operation_duration_seconds_count", operation="snapshot") >= 1


async def test_the_schema_declares_unique_candidates(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    candidate_ids = schema["components"]["schemas"]["RankRequest"]["properties"]["candidate_ids"]
    assert candidate_ids["uniqueItems"] is True
    # What the schema declares is what is enforced: 1 and 1.0 are the same JSON Schema value.
    duplicated = await client.post("/rank", json={"user_id": 1, "candidate_ids": [1, 1.0]})
    assert duplicated.status_code == 422


async def test_an_integral_float_is_an_integer_wherever_the_schema_says_integer(
    client: httpx.AsyncClient,
) -> None:
    """JSON Schema's integer is any number without a fraction: 4718.0 is one, as for
    schema-driven clients; the answer is the one the plain integer gets."""
    as_int = {"user_id": 4718, "candidate_ids": [11, 12, 13], "k": 2, "request_time": T0}
    as_float = {"user_id": 4718.0, "candidate_ids": [11.0, 12, 13.0], "k": 2.0, "request_time": T0}
    ranked = [(await client.post("/rank", json=body)) for body in (as_int, as_float)]
    assert [r.status_code for r in ranked] == [200, 200]
    assert ranked[0].json() == ranked[1].json()
    event = {"event_id": "f1", "user_id": 4718.0, "item_id": 12.0, "action": "click",
             "timestamp": T0}  # fmt: skip
    posted = await client.post("/events", json={"events": [event]})
    assert posted.json() == {"accepted": 1, "duplicates": 0}
    again = await client.post("/events", json={"events": [{**event, "user_id": 4718}]})
    assert again.json() == {"accepted": 0, "duplicates": 1}  # the same user, the same event
    put = await client.put(
        "/items", json={"items": [{"item_id": 5000.0, "attributes": {"category": 2.0}}]}
    )
    assert put.status_code == 200 and put.json()["items"][0]["item_id"] == 5000
    explained = await client.post("/explain", json={"user_id": 4718.0, "item_id": 12.0, "top": 2.0})
    assert explained.status_code == 200, explained.text
    assert (explained.json()["user_id"], explained.json()["history_length"]) == (4718, 1)
    for fraction in ({"user_id": 4718.5}, {"item_id": 0.5}, {"top": 2.5}):
        refused = await client.post("/explain", json={"user_id": 1, "item_id": 2, **fraction})
        assert refused.status_code == 422


async def test_a_405_allows_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    """GET and POST /admin/model are two routes: the 405 names both, not the first one's only."""
    response = await client.request("OPTIONS", "/admin/model")
    assert response.status_code == 405
    assert response.headers.get_list("allow") == ["GET, POST"]
    assert (await client.delete("/rank")).headers["allow"] == "POST"


async def test_a_post_with_more_events_of_one_user_than_the_retry_window_is_refused(
    artifact_dir: Path,
) -> None:
    # A retry is recognised by the digests of a user's last dedup_window events: a post with
    # more events of one user could not be retried safely, so it is refused whole.
    settings = make_settings(artifact_dir, max_events_per_post=MAX_EVENTS, dedup_window=3)
    rng = np.random.default_rng(4)
    async with service_client(settings) as client:
        over = events_payload(15, 4, rng)
        over["events"] += events_payload(16, 1, rng)["events"]
        response = await client.post("/events", json=over)
        assert response.status_code == 409  # schema-valid: the schema cannot count per user
        assert issue_fields(response) == ["events"]
        assert "user 15 has 4 events" in response.json()["detail"][0]["msg"]
        assert "dedup_window=3" in response.json()["detail"][0]["msg"]
        ranked = await client.post("/rank", json={"user_id": 16, "candidate_ids": [1]})
        assert ranked.json()["history_length"] == 0
        within = events_payload(15, 3, rng)
        within["events"] += events_payload(16, 2, rng)["events"]
        assert (await client.post("/events", json=within)).json()["accepted"] == 5
        assert (await client.post("/events", json=within)).json()["duplicates"] == 5
