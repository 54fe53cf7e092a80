"""Failures are answered, counted and never a bare 500: a store outage is a 503 with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import make_settings, service_client

pytestmark = pytest.mark.anyio


async def test_an_unreachable_store_degrades_rank_and_refuses_events(artifact_dir: Path) -> None:
    settings = make_settings(
        artifact_dir, store="redis", redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2
    )
    async with service_client(settings) as client:
        assert (await client.get("/healthz")).status_code == 200
        # Still ready: every replica shares the store, so a store outage must not empty the
        # Service; readiness reports it.
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["store"] == "unavailable"
        ranked = await client.post("/rank", json={"user_id": 1, "candidate_ids": [1, 2]})
        assert ranked.status_code == 200
        assert (ranked.json()["state_cache"], ranked.json()["history_length"]) == ("degraded", 0)
        posted = await client.post(
            "/events",
            json={"events": [{"event_id": "e", "user_id": 1, "item_id": 2, "action": "click",
                              "timestamp": 1.7e9}]},
        )  # fmt: skip
        assert posted.status_code == 503
        assert posted.headers["retry-after"] == "1"
        # The body says what to do, never what Redis said (hosts, ports, commands).
        assert posted.json() == {"detail": "state store unavailable; retry later"}
        metrics = (await client.get("/metrics")).text
        assert 'ifa_errors_total{kind="store"} 1.0' in metrics
        assert 'ifa_state_cache_total{outcome="degraded"} 1.0' in metrics
        # Started without reaching the store: each request first agrees on its layout record.
        assert 'ifa_store_errors_total{operation="agree_layout"} 3.0' in metrics


async def test_requests_before_the_lifespan_are_refused_cleanly(artifact_dir: Path) -> None:
    import httpx

    from service.app import create_app

    app = create_app(make_settings(artifact_dir))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        assert (await client.get("/readyz")).status_code == 503
        response = await client.post("/rank", json={"user_id": 1, "candidate_ids": [1]})
        assert response.status_code == 503
        assert "not finished starting" in response.json()["detail"]
