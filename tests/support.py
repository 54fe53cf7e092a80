"""Plain helpers shared by tests in several folders: a small exported artefact and the service
driven in-process. Fixtures live in the conftest files; these are ordinary functions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from model.artifact import load_artifact
from model.catalogue import Catalogue
from model.checkpoint import Checkpoint
from model.export import export_artifact
from model.nets import build_net
from model.nets.ifa import IFA
from service.app import create_app
from service.settings import Settings
from tests.factories import live_channel, small_spec

CATALOGUE_ITEMS = 1000
"""Items 0..999 are in the test catalogue; larger ids are unknown."""
T0 = 1.7e9


def build_artifact(
    out: Path,
    time_decay: bool,
    seed: int = 0,
    fusion: dict[str, float] | None = None,
    update_latest: bool = True,
    precisions: tuple[str, ...] = ("fp32",),
    actions: tuple[str, ...] | None = None,
    net_name: str = "ifa",
) -> Path:
    """Export an untrained IFA (small spec, torchscript) with a synthetic catalogue; ``seed``
    picks the weights and catalogue, ``fusion`` the score's weights (the model's version
    changes with either, its state version with the seed only). ``net_name`` an IFA network of
    the registry; one with the exact-match channel gets γ > 0 so the channel's terms show.

    fp32 only unless asked: the service's precision "auto" then serves fp32, which the parity
    tests compare with the eager network at 1e-5; bf16 has tests of its own. ``actions``: the
    model's action vocabulary (default :data:`model.features.ACTIONS`)."""
    import dataclasses

    import torch

    torch.manual_seed(seed)
    spec = small_spec()
    if actions is not None:
        spec = dataclasses.replace(spec, actions=actions)
    net = build_net(net_name, spec, time_decay=time_decay)
    if isinstance(net, IFA) and net.encoder.channel is not None:
        live_channel(net)
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
    export_artifact(
        Checkpoint(net_name, spec, net),
        catalogue,
        out,
        fusion=fusion,
        formats=("torchscript",),
        update_latest=update_latest,
        precisions=precisions,
    )
    return out


TEST_REQUEST_BUDGET_SECONDS = 30.0
"""In-process tests check answers, not speed: on a loaded CI machine a burst of requests may queue
past the production budget (0.5 s) and get a 503. Tests of the budget set their own."""


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    values = {"request_budget_seconds": TEST_REQUEST_BUDGET_SECONDS} | overrides
    return Settings(model_dir=model_dir, **values)


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


def scores_from_scratch(
    model_dir: Path,
    user_id: int,
    events: list[dict[str, Any]],
    event_item_rows: np.ndarray,
    candidate_rows: np.ndarray,
    request_time: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (M,), probabilities (M, 4)) from the exported programs: the user's ``events``
    (as posted to /events, their items' (N, F_item) rows given) encoded from scratch, and the
    (M, F_item) candidate rows scored against that state at ``request_time``."""
    import torch

    model = load_artifact(model_dir)
    spec = model.spec
    times = np.array([e["timestamp"] for e in events], dtype=np.float64)
    actions = np.array([spec.action_index(e["action"]) for e in events], dtype=np.int64)
    rows = spec.event_rows(event_item_rows.reshape(len(events), -1), actions, times)
    with torch.no_grad():
        s, z = model.encode(torch.from_numpy(rows), torch.from_numpy(times), request_time)
        user = spec.user_rows({"user_id": np.array([user_id])})[0]
        probabilities, scores = model.score(
            torch.from_numpy(user), torch.from_numpy(candidate_rows), s, z
        )
    return scores.numpy(), probabilities.numpy()


async def rank_all(
    client: httpx.AsyncClient, user_id: int, candidates: list[int], request_time: float
) -> dict[str, Any]:
    """The 200 body of a /rank that returns every candidate, scored at ``request_time``."""
    response = await client.post(
        "/rank",
        json={
            "user_id": user_id,
            "candidate_ids": candidates,
            "k": len(candidates),
            "request_time": request_time,
        },
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def remembered_digests(client: Any, prefix: str, user_id: int) -> set[bytes]:
    """The event-id digests a Redis store remembers for a user (its idempotency window), read
    with a synchronous redis-py client: what a fault test checks acknowledged events against."""
    from service.stores.idempotency import unpack_entries

    value = client.get(f"{prefix}:{{u:{user_id}}}:eids")
    return {digest for digest, stamp in unpack_entries(bytes(value or b"")) if stamp > 0}


def train_and_export(
    world_dir: Path, out: Path, fusion: dict[str, float], batch_size: int, max_requests: int
) -> Path:
    """A prepared world trained briefly (one thread, ``max_requests`` requests) and exported as
    fp32 TorchScript with ``fusion``'s score weights into ``out``; returns ``out``."""
    from model.data import item_catalogue, load_world, spec_for_world
    from model.train import TrainSettings, train

    world = load_world(world_dir)
    settings = TrainSettings(
        world=world_dir,
        batch_size=batch_size,
        max_requests=max_requests,
        threads=1,
        progress=False,
    )
    result = train(settings, world)
    assert result.checkpoint is not None
    catalogue = Catalogue(item_catalogue(world), spec_for_world(world))
    export_artifact(
        result.checkpoint,
        catalogue,
        out,
        fusion=fusion,
        formats=("torchscript",),
        precisions=("fp32",),
    )
    return out
