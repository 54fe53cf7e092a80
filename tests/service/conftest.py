"""Fixtures of the service tests: small exported artefacts, apps driven in-process over
httpx's ASGI transport, and a real Redis server (never a mock)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from model.catalogue import Catalogue
from model.checkpoint import Checkpoint
from model.export import export_artifact
from model.nets import build_net
from service.app import create_app
from service.settings import Settings
from tests.factories import small_spec

CATALOGUE_ITEMS = 1000
"""Items 0..999 are in the test catalogue; larger ids are unknown."""
T0 = 1.7e9


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def build_artifact(out: Path, time_decay: bool, seed: int = 0) -> Path:
    """Export an untrained IFA (small spec, torchscript) with a synthetic catalogue."""
    import torch

    torch.manual_seed(seed)
    spec = small_spec()
    net = build_net("ifa", spec, time_decay=time_decay)
    with torch.no_grad():
        # An untrained net barely reacts to its input (embeddings of std 0.05), which would let
        # a wrong fold pass a 1e-5 comparison: make histories matter, and decay fast (a
        # half-life of about a day), so that a mis-weighted event shows.
        for module in net.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.mul_(30.0)
        decay_logit = net.get_parameter("encoder.decay_logit")
        decay_logit.fill_(0.0)
    rng = np.random.default_rng(seed)
    catalogue = Catalogue(
        {
            "item_id": np.arange(CATALOGUE_ITEMS),
            "category": rng.integers(0, 8, CATALOGUE_ITEMS),
            "author": rng.integers(0, 50, CATALOGUE_ITEMS),
        },
        spec,
    )
    export_artifact(Checkpoint("ifa", spec, net), catalogue, out, formats=("torchscript",))
    return out


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export root (with LATEST) of a model without time decay."""
    return build_artifact(tmp_path_factory.mktemp("artefact"), time_decay=False)


@pytest.fixture(scope="session")
def decay_artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export root of a model with per-head time decay (folds must discount correctly)."""
    return build_artifact(tmp_path_factory.mktemp("artefact-decay"), time_decay=True, seed=1)


# -- Redis ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: $REDIS_URL, else 127.0.0.1:6379, else a redis-server started here."""
    url = os.environ.get("REDIS_URL")
    if url:
        if not _answers(url):
            pytest.fail(f"REDIS_URL={url} is set but does not answer PING")
        yield url
        return
    if _answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "no Redis server: REDIS_URL is unset, nothing answers on 127.0.0.1:6379 and "
            "redis-server is not installed (apt-get install redis-server)"
        )
    port = _free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"redis-server on port {port} did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"ifa-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# -- apps ----------------------------------------------------------------------------------


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    return Settings(model_dir=model_dir, **overrides)


@asynccontextmanager
async def service_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An app with its lifespan running, and a client that calls it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            client.app = app  # type: ignore[attr-defined]  # tests read app.state
            yield client


def events_payload(
    user_id: int,
    n: int,
    rng: np.random.Generator,
    start: int = 0,
    item_high: int = 1200,
    spacing: float = 3600.0,
) -> dict[str, Any]:
    """n events of one user with ids ``u<user>-e<i>`` at about T0 + i·spacing, i from start."""
    actions = ["impression", "click", "long_view", "like"]
    return {
        "events": [
            {
                "event_id": f"u{user_id}-e{start + i}",
                "user_id": user_id,
                "item_id": int(rng.integers(0, item_high)),
                "action": actions[int(rng.integers(0, 4))],
                "timestamp": T0 + spacing * (start + i) + float(rng.uniform(0, spacing / 2)),
            }
            for i in range(n)
        ]
    }
