"""Hot rollout, in process: a new LATEST (or POST /admin/model) is loaded, warmed and switched to
while the old version serves; a fusion-only change keeps every cached state; an encoder change
warms the active users and deletes the old states; a rollback restores the scores bit for bit.
Runs on the in-process store, a real Redis and a real Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.artifact import load_manifest
from service.api.deps import Services
from tests.service.test_consistency import rank
from tests.support import build_artifact, events_payload, make_settings, service_client

pytestmark = pytest.mark.anyio
USERS = (1, 2, 3)
CANDIDATES = list(range(40))
TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"model_poll_seconds": 0.05, "rollout_cleanup_delay_seconds": 0.0, "api_token": TOKEN}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def services_of(client: httpx.AsyncClient) -> Services:
    services = client.app.state.services  # type: ignore[attr-defined]
    assert isinstance(services, Services)
    return services


async def serving(client: httpx.AsyncClient, version: str) -> bool:
    return services_of(client).runtime.version == version


@pytest.fixture
def export_root(tmp_path: Path) -> Path:
    """An export root whose LATEST is an untrained model (seed 0, click-only fusion)."""
    return build_artifact(tmp_path / "models", time_decay=True)


async def post_histories(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(0)
    for user_id in USERS:
        response = await client.post("/events", json=events_payload(user_id, 30, rng), headers=AUTH)
        assert response.status_code == 200


async def test_a_fusion_change_keeps_every_cached_state(export_root: Path) -> None:
    first = load_manifest(export_root)
    async with service_client(make_settings(export_root, **FAST)) as client:
        await post_histories(client)
        before = {user: await rank(client, user, CANDIDATES) for user in USERS}
        await services_of(client).ranker.drain(5)
        build_artifact(export_root, time_decay=True, fusion={"click": 1.0, "like": 2.0})
        second = load_manifest(export_root)
        assert second.version != first.version and second.state_version == first.state_version
        await eventually(lambda: serving(client, second.version))
        after = {user: await rank(client, user, CANDIDATES) for user in USERS}
    for user in USERS:
        assert before[user]["model_version"] == first.version
        assert after[user]["model_version"] == second.version
        assert after[user]["state_cache"] == "hit"  # no cold cache after the switch
        assert after[user]["items"] != before[user]["items"]  # the new fusion scores


async def test_an_encoder_change_warms_switches_cleans_up_and_rolls_back(
    export_root: Path, store_settings: dict[str, Any]
) -> None:
    first = load_manifest(export_root)
    settings = make_settings(export_root, **FAST, **store_settings)
    async with service_client(settings) as client:
        services = services_of(client)
        await post_histories(client)
        before = {user: await rank(client, user, CANDIDATES) for user in USERS}
        await services.ranker.drain(5)
        await services.activity.flush()  # who is active reaches the store now, not in 1 s
        assert set(await services.store.active_users(10)) == set(USERS)

        build_artifact(export_root, time_decay=True, seed=7)
        second = load_manifest(export_root)
        assert second.state_version != first.state_version
        await eventually(lambda: serving(client, second.version))
        assert services.rollout.status.warm_done == len(USERS)
        after = {user: await rank(client, user, CANDIDATES) for user in USERS}
        assert all(after[u]["state_cache"] == "hit" for u in USERS)  # warmed before the switch
        assert all(after[u]["model_version"] == second.version for u in USERS)

        async def old_states_deleted() -> bool:
            snapshots = [
                await services.store.snapshot(str(first.state_version), user, 60) for user in USERS
            ]
            return all(s.state is None for s in snapshots)

        await eventually(old_states_deleted)

        response = await client.post("/admin/model", json={"version": first.version}, headers=AUTH)
        assert response.status_code == 202, response.text
        assert (export_root / "LATEST").read_text().strip() == first.version
        await eventually(lambda: serving(client, first.version))
        rolled_back = {user: await rank(client, user, CANDIDATES) for user in USERS}
        state = (await client.get("/admin/model", headers=AUTH)).json()
    for user in USERS:
        # Bit for bit: the JSON floats are the same numbers.
        assert rolled_back[user]["items"] == before[user]["items"]
        assert rolled_back[user]["model_version"] == first.version
        assert rolled_back[user]["state_cache"] == "hit"  # warmed again before the switch back
    assert state["history"] == [first.version, second.version, first.version]
    assert state["phase"] == "serving" and state["serving"] == first.version


class _HeldSnapshots:
    """A store whose snapshots wait until released: holds a /rank in its state fetch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def snapshot(self, version: str, user_id: int, ttl_seconds: int) -> Any:
        self.waiting.set()
        await self.release.wait()
        return await self.inner.snapshot(version, user_id, ttl_seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_request_in_flight_finishes_on_its_version(export_root: Path) -> None:
    first = load_manifest(export_root)
    async with service_client(make_settings(export_root, model_poll_seconds=0)) as client:
        services = services_of(client)
        await post_histories(client)
        expected = await rank(client, 1, CANDIDATES)
        old_ranker = services.ranker
        held = _HeldSnapshots(old_ranker.store)
        old_ranker.store = held
        in_flight = asyncio.create_task(rank(client, 1, CANDIDATES))
        await held.waiting.wait()
        build_artifact(export_root, time_decay=True, fusion={"like": 1.0})
        second = load_manifest(export_root)
        await services.rollout.roll_to(second.version)
        assert services.runtime.version == second.version
        held.release.set()
        finished = await in_flight
        later = await rank(client, 1, CANDIDATES)
    assert finished["model_version"] == first.version
    assert finished["items"] == expected["items"]  # scored by the old version throughout
    assert later["model_version"] == second.version


async def test_a_broken_version_fails_and_the_old_one_keeps_serving(export_root: Path) -> None:
    first = load_manifest(export_root)
    broken = export_root / "ifa-broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"version": "ifa-broken"}))
    async with service_client(make_settings(export_root, **FAST)) as client:
        (export_root / "LATEST").write_text("ifa-broken\n")
        services = services_of(client)

        async def failed() -> bool:
            return services.rollout.status.phase == "failed"

        await eventually(failed)
        assert services.rollout.status.error  # says why
        assert services.rollout.status.target == "ifa-broken"
        response = await rank(client, 1, CANDIDATES)
    assert response["model_version"] == first.version


async def test_the_admin_call_needs_a_configured_token(export_root: Path) -> None:
    version = load_manifest(export_root).version
    async with service_client(make_settings(export_root)) as client:
        open_call = await client.post("/admin/model", json={"version": version})
    assert open_call.status_code == 403
    async with service_client(make_settings(export_root, api_token=TOKEN)) as client:
        anonymous = await client.post("/admin/model", json={"version": version})
        wrong = await client.post(
            "/admin/model", json={"version": version}, headers={"Authorization": "Bearer no"}
        )
        unknown = await client.post("/admin/model", json={"version": "ifa-nope"}, headers=AUTH)
        escape = await client.post("/admin/model", json={"version": "../x"}, headers=AUTH)
        same = await client.post("/admin/model", json={"version": version}, headers=AUTH)
    assert (anonymous.status_code, wrong.status_code) == (401, 403)
    assert unknown.status_code == 404 and escape.status_code == 404
    assert same.status_code == 202 and same.json()["serving"] == version
