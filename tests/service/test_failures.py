"""Failures are answered, counted and never a bare 500: a store outage is a 503 with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.deps import Services
from tests.support import make_settings, service_client

pytestmark = pytest.mark.anyio


async def test_an_unreachable_store_is_a_503_and_not_ready(artifact_dir: Path) -> None:
    settings = make_settings(
        artifact_dir, store="redis", redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2
    )
    async with service_client(settings) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["detail"].startswith("store unreachable")
        ranked = await client.post("/rank", json={"user_id": 1, "candidate_ids": [1]})
        assert ranked.status_code == 503
        assert "state store unavailable" in ranked.json()["detail"]
        posted = await client.post(
            "/events",
            json={"events": [{"event_id": "e", "user_id": 1, "item_id": 2, "action": "click",
                              "timestamp": 1.7e9}]},
        )  # fmt: skip
        assert posted.status_code == 503
        metrics = (await client.get("/metrics")).text
        assert 'ifa_errors_total{kind="store"} 2.0' in metrics
        assert 'ifa_store_errors_total{operation="snapshot"} 1.0' in metrics


async def test_a_corrupt_cached_state_is_recomputed(artifact_dir: Path) -> None:
    async with service_client(make_settings(artifact_dir)) as client:
        await client.post(
            "/events",
            json={"events": [{"event_id": "e", "user_id": 4, "item_id": 2, "action": "like",
                              "timestamp": 1.7e9}]},
        )  # fmt: skip
        good = (await client.post("/rank", json={"user_id": 4, "candidate_ids": [1, 2]})).json()
        services = client.app.state.services  # type: ignore[attr-defined]
        assert isinstance(services, Services)
        version = services.runtime.version
        # A blob of another shape, under a cursor that would otherwise count as current.
        await services.store.put_state(version, 4, b"\x01" * 40, 99, 60)
        again = (await client.post("/rank", json={"user_id": 4, "candidate_ids": [1, 2]})).json()
        assert again["state_cache"] == "miss"
        assert again["items"] == good["items"]


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
