"""Precision and format choice at load time: bf16 where the CPU and artefact have it, "auto"
format by the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from loadtest.harness import running_service
from model.artifact import (
    Manifest,
    compile_target,
    cpu_supports_bf16,
    load_artifact,
    resolve_format,
    resolve_precision,
)
from model.catalogue import Catalogue
from model.data import load_world, request_stream, save_world
from model.export import catalogue_source, export_artifact
from model.layers import Towers
from model.metrics import objective_aucs
from model.precision import MAX_AUC_DROP, MIN_TOP_OVERLAP, candidate_pool, serve, top_overlap
from model.serving import FusedTowers
from model.train import TrainSettings, train
from model.world import generate_world
from tests.support import build_artifact


@pytest.fixture(scope="module")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_artifact(tmp_path_factory.mktemp("precision"), time_decay=False)


def manifest_with(formats: dict[str, dict[str, Any]], files: list[str]) -> Manifest:
    return Manifest(
        version="ifa-x", net="ifa", net_config={}, spec={}, objectives=[], actions=[],
        fusion={}, heads=1, key_dim=1, value_dim=1, decay_rates=[0.0], dtype="float32",
        files={name: {} for name in files}, formats=formats, created_at="", training={},
        torch_version=torch.__version__,
    )  # fmt: skip


def test_auto_takes_aoti_only_where_it_was_compiled_for_this_host() -> None:
    here = {"status": "ok", "compiled_for": compile_target()}
    elsewhere = {"status": "ok", "compiled_for": compile_target() | {"cpu_capability": "AVX2"}}
    unrecorded = {"status": "ok"}  # artefacts exported before the target was recorded
    both = ["torchscript", "aoti"]
    assert resolve_format(manifest_with({"aoti": here}, both), "auto") == "aoti"
    assert resolve_format(manifest_with({"aoti": elsewhere}, both), "auto") == "torchscript"
    assert resolve_format(manifest_with({"aoti": unrecorded}, both), "auto") == "torchscript"
    assert resolve_format(manifest_with({}, ["torchscript"]), "auto") == "torchscript"
    # An explicit format is taken as asked.
    assert resolve_format(manifest_with({"aoti": elsewhere}, both), "aoti") == "aoti"


def test_auto_loads_torchscript_from_an_artefact_without_aoti(artefact: Path) -> None:
    assert load_artifact(artefact, "auto").program_format == "torchscript"


def test_auto_precision_is_bf16_only_where_cpu_and_artefact_have_it() -> None:
    with_bf16 = manifest_with({}, ["torchscript"])
    with_bf16.files["torchscript"] = {"encoder": "e", "scorer": "s", "scorer_bf16": "b"}
    without = manifest_with({}, ["torchscript"])
    without.files["torchscript"] = {"encoder": "e", "scorer": "s"}
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert resolve_precision(with_bf16, "torchscript", "auto") == expected
    assert resolve_precision(without, "torchscript", "auto") == "fp32"
    assert resolve_precision(without, "torchscript", "fp32") == "fp32"


def test_bf16_from_an_artefact_exported_without_it_says_how_to_get_it(
    tmp_path: Path,
) -> None:
    root = build_artifact(tmp_path, time_decay=False, precisions=("fp32",))
    reason = "export again" if cpu_supports_bf16() else "bf16 needs a CPU"
    with pytest.raises(ValueError, match=reason):
        load_artifact(root, "torchscript", "bf16")
    assert load_artifact(root, "torchscript", "auto").precision == "fp32"


def test_unknown_precision_is_refused(artefact: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'"):
        load_artifact(artefact, "torchscript", "fp8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(world, export root) of IFA trained on the tiny world: an untrained net's scores are
    near-ties that any rounding reorders, which says nothing about serving quality."""
    world = tmp_path_factory.mktemp("worlds") / "tiny-0"
    save_world(generate_world("tiny", 0), world)
    run = tmp_path_factory.mktemp("run")
    result = train(
        TrainSettings(
            world=world, net="ifa", batch_size=4, lr=1e-2, threads=1, progress=False, out=run,
            max_history=1000,
        )
    )  # fmt: skip
    assert result.checkpoint is not None
    root = tmp_path_factory.mktemp("trained-artefact")
    catalogue = Catalogue.load(catalogue_source(world), result.checkpoint.spec)
    export_artifact(result.checkpoint, catalogue, root, formats=("torchscript",))
    return world, root


def test_bf16_matches_fp32_within_the_stated_tolerance(trained: tuple[Path, Path]) -> None:
    """Where the CPU has bf16: the acceptance rule of results/precision.md on a trained model,
    every objective's AUC within MAX_AUC_DROP of fp32 and a mean top-50 overlap of at least
    MIN_TOP_OVERLAP when each request's user and state score the same 1,000 items. Elsewhere:
    bf16 is refused with a message that says why."""
    world_path, root = trained
    if not cpu_supports_bf16():
        with pytest.raises(ValueError, match=r"bf16 needs a CPU with bfloat16 instructions"):
            load_artifact(root, "torchscript", "bf16")
        return
    fp32 = load_artifact(root, "torchscript", "fp32")
    bf16 = load_artifact(root, "torchscript", "bf16")
    assert bf16.precision == "bf16"
    world = load_world(world_path)
    pool = candidate_pool(fp32.catalogue, 1000)
    labels: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {"fp32": [], "bf16": []}
    overlaps: list[float] = []
    for request in request_stream(world, fp32.spec, 1000):
        served = {"fp32": serve(fp32, request, pool), "bf16": serve(bf16, request, pool)}
        assert request.labels is not None
        labels.append(request.labels)
        for name, (probabilities, _) in served.items():
            assert np.isfinite(probabilities).all()
            scores[name].append(probabilities)
        overlaps.append(top_overlap(served["fp32"][1], served["bf16"][1]))
    aucs = {n: objective_aucs(np.concatenate(labels), np.concatenate(v)) for n, v in scores.items()}
    for objective, auc in aucs["fp32"].items():
        assert abs(auc - aucs["bf16"][objective]) <= MAX_AUC_DROP, (objective, aucs)
    assert np.mean(overlaps) >= MIN_TOP_OVERLAP, np.mean(overlaps)


@pytest.mark.e2e
def test_the_service_scores_in_bf16_by_default_where_it_can(tmp_path: Path) -> None:
    """The default precision (auto) of a real service process on an artefact with a bf16
    scorer: bf16 where the CPU has it, fp32 elsewhere, said by GET /model; it ranks."""
    root = build_artifact(tmp_path / "model", time_decay=False, precisions=("fp32", "bf16"))
    with (
        running_service(root, tmp_path / "service.log", timeout=60) as service,
        httpx.Client(base_url=service.url, timeout=10) as client,
    ):
        info = client.get("/model").json()
        ranked = client.post("/rank", json={"user_id": 1, "candidate_ids": [3, 5, 7], "k": 2})
    assert info["precision"] == ("bf16" if cpu_supports_bf16() else "fp32")
    assert info["program_format"] == "torchscript"
    assert ranked.status_code == 200 and len(ranked.json()["items"]) == 2


def test_fused_towers_compute_what_the_towers_do() -> None:
    """The bf16 scorer's tower layout (one matmul for every first layer, a batched matmul per
    later layer) is the same arithmetic as one MLP per objective, checked in float32."""
    towers = Towers(in_dim=24, hidden=(16, 8))
    x = torch.randn(2, 37, 24)
    with torch.no_grad():
        assert torch.allclose(FusedTowers(towers)(x), towers(x), atol=1e-5)
