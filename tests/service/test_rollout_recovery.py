"""A rollout that fails is retried, a failure is forgotten when LATEST moves on, and the cleanup
after a rollout deletes only the states of versions no worker serves (workers advertise theirs
in the store); after a switch the new version's objects are frozen out of the collector's reach.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.artifact import LATEST_FILE, load_manifest
from model.export import write_latest
from service import rollout as rollout_module
from service.settings import Settings
from service.stores import open_store
from tests.service.test_consistency import rank
from tests.service.test_rollout import eventually, services_of
from tests.support import build_artifact, events_payload, make_settings, service_client

pytestmark = pytest.mark.anyio
USERS = (1, 2, 3)
CANDIDATES = list(range(40))
TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {
    "model_poll_seconds": 0.05,
    "rollout_cleanup_delay_seconds": 0.0,
    "api_token": TOKEN,
    "store": "memory",
}


@pytest.fixture
def export_root(tmp_path: Path) -> Path:
    return build_artifact(tmp_path / "models", time_decay=True)


def export_unpublished(root: Path, **options: Any) -> str:
    """Export a version into ``root`` without pointing LATEST at it; its version."""
    before = {path.name for path in root.iterdir()}
    build_artifact(root, time_decay=True, update_latest=False, **options)
    (added,) = {path.name for path in root.iterdir()} - before
    return added


@asynccontextmanager
async def broken(root: Path, version: str) -> AsyncIterator[None]:
    """The version's encoder program is missing (a half-copied artefact) until the block ends."""
    manifest = load_manifest(root / version)
    program = root / version / manifest.files["torchscript"]["encoder"]
    aside = program.with_name(program.name + ".away")
    program.rename(aside)
    try:
        yield
    finally:
        aside.rename(program)


async def test_a_failed_rollout_is_retried_until_it_loads(export_root: Path) -> None:
    settings = make_settings(export_root, **FAST, rollout_retry_seconds=0.2)
    async with service_client(settings) as client:
        services = services_of(client)
        frozen_at_start = gc.get_freeze_count()
        second = export_unpublished(export_root, fusion={"like": 1.0})
        async with broken(export_root, second):
            write_latest(export_root, second)

            async def failed_twice() -> bool:
                return services.rollout.status.attempts >= 2

            await eventually(failed_twice)
            assert services.rollout.status.phase == "failed"
            assert "attempt" in (services.rollout.status.error or "")
        await eventually(lambda: serving(client, second))
        status = services.rollout.status
        assert (status.phase, status.error, status.attempts) == ("serving", None, 0)

        async def refrozen() -> bool:
            return gc.get_freeze_count() != frozen_at_start

        await eventually(refrozen)  # the new version's objects are frozen too


async def serving(client: httpx.AsyncClient, version: str) -> bool:
    return services_of(client).runtime.version == version


async def test_a_failure_is_forgotten_when_latest_moves_on(export_root: Path) -> None:
    # No retry within the test: only a change of LATEST brings the failed version back.
    settings = make_settings(export_root, **FAST, rollout_retry_seconds=3600.0)
    async with service_client(settings) as client:
        services = services_of(client)
        second = export_unpublished(export_root, fusion={"like": 1.0})
        third = export_unpublished(export_root, fusion={"like": 2.0})
        async with broken(export_root, second):
            write_latest(export_root, second)

            async def failed() -> bool:
                return services.rollout.status.phase == "failed"

            await eventually(failed)
        write_latest(export_root, third)
        await eventually(lambda: serving(client, third))
        write_latest(export_root, second)  # repaired now, and named again
        await eventually(lambda: serving(client, second))
        assert (export_root / LATEST_FILE).read_text().strip() == second


class _CountedCleanups:
    """The store, counting the cleanup's scans."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cleanups = 0

    async def delete_states(self, *args: Any) -> int:
        self.cleanups += 1
        deleted: int = await self.inner.delete_states(*args)
        return deleted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_cleanup_keeps_the_states_of_versions_another_worker_serves(
    export_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cleanup looks again after a record's lifetime: often here, so the test ends soon.
    monkeypatch.setattr(rollout_module, "CLEANUP_RECHECK_SECONDS", 0.3)
    first = load_manifest(export_root)
    async with service_client(make_settings(export_root, **FAST)) as client:
        services = services_of(client)
        store = services.store
        rng = np.random.default_rng(0)
        for user in USERS:
            await client.post("/events", json=events_payload(user, 20, rng), headers=AUTH)
            await rank(client, user, CANDIDATES)
        await services.ranker.drain(5)
        await services.activity.flush()
        counted = _CountedCleanups(services.rollout.store)
        services.rollout.store = counted

        # Another worker (another replica, or one whose rollout failed) stays on the first
        # encoder and says so, as its rollout's heartbeat does.
        async def other_worker() -> None:
            while True:
                await store.advertise_serving("replica-b:1", {str(first.state_version)}, 2.0)
                await asyncio.sleep(0.05)

        behind = asyncio.create_task(other_worker())

        async def old_states() -> list[bytes | None]:
            return [
                (await store.snapshot(str(first.state_version), user, 60)).state for user in USERS
            ]

        try:
            build_artifact(export_root, time_decay=True, seed=7)
            second = load_manifest(export_root)
            assert second.state_version != first.state_version
            await eventually(lambda: serving(client, second.version))

            async def looked_twice() -> bool:
                return counted.cleanups >= 2

            await eventually(looked_twice)
            assert all(state is not None for state in await old_states())
        finally:
            behind.cancel()

        async def deleted_once_unserved() -> bool:
            return all(state is None for state in await old_states())

        await eventually(deleted_once_unserved)
        kept = [await store.snapshot(str(second.state_version), u, 60) for u in USERS]
        assert all(snapshot.state is not None for snapshot in kept)


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_the_store_keeps_what_is_advertised_and_forgets_it_after_its_ttl(
    backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "redis":
        settings = Settings(
            store="redis",
            redis_url=request.getfixturevalue("redis_url"),
            redis_prefix=request.getfixturevalue("redis_prefix"),
        )
    else:
        settings = Settings(store="memory")
    store = open_store(settings, 100)
    try:
        for version in ("v1", "v2", "v3"):
            await store.put_state(version, 5, b"state", 1, 60)
        await store.advertise_serving("a:1", {"v1"}, 0.4)
        await store.advertise_serving("b:1", {"v2", "v3"}, 60)
        assert await store.served_state_versions() == {"v1", "v2", "v3"}
        await store.advertise_serving("b:1", {"v2"}, 60)  # a worker's record is replaced
        await asyncio.sleep(0.5)
        assert await store.served_state_versions() == {"v2"}  # a's record expired
        assert await store.delete_states({"v2"}, 100, 0.0) == 2
        assert (await store.snapshot("v2", 5, 60)).state == b"state"
        assert (await store.snapshot("v1", 5, 60)).state is None
    finally:
        await store.close()
