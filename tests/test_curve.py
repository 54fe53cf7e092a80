"""The learning curve and the cross-category worlds: the prequential cut the curve relies on,
the same-category oracle's alignment with the truth, and both studies end to end on tiny worlds
(every code path, in seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import batches, spec_for_world
from model.experiments.common import Options
from model.experiments.cross import cross, recomputed_truth
from model.experiments.curve import CURVE_UNITS, CUTS, curve, window
from model.loss import joint_probabilities
from model.train import TrainSettings, train
from model.world import generate_world

BATCH = 8


def _scores(net: torch.nn.Module, world, rows: np.ndarray) -> np.ndarray:
    """The joint probabilities ``net`` gives the real candidates of one batch of ``rows``."""
    spec = spec_for_world(world)
    batch, _ = next(iter(batches(world, spec, len(rows), None, with_truth=True, request_rows=rows)))
    with torch.no_grad():
        scored = joint_probabilities(net(batch)).numpy()
    return scored[batch.candidate_mask.numpy()]


def test_a_prediction_at_step_t_never_saw_batch_t():
    """Batch t's recorded predictions are what the model trained on batches 0..t-1 gives it,
    not what the model after its step on batch t gives."""
    world = generate_world("tiny", 0)
    t = 3
    settings = TrainSettings(
        Path("unused"), net="ifa", batch_size=BATCH, lr=0.05, max_requests=(t + 1) * BATCH,
        max_history=None, threads=1, progress=False,
    )  # fmt: skip
    through_t = train(settings, world)
    before_t = train(replace(settings, max_requests=t * BATCH), world)
    assert through_t.predictions is not None and before_t.checkpoint is not None
    assert through_t.checkpoint is not None
    rows = np.arange(t * BATCH, (t + 1) * BATCH)
    recorded = through_t.predictions.scores[np.isin(through_t.predictions.request_rows, rows)]
    np.testing.assert_allclose(recorded, _scores(before_t.checkpoint.net, world, rows), atol=1e-5)
    after = _scores(through_t.checkpoint.net, world, rows)
    assert np.abs(recorded - after).max() > 1e-3  # the step on batch t changed the scores


def test_the_same_category_truth_is_aligned_with_the_saved_truth():
    """Recomputed with the whole history it is the truth the predictions carry (so the candidates
    line up); restricted to same-category events it differs, impressions aside."""
    world = generate_world("tiny", 0)
    spec = spec_for_world(world)
    rows = np.arange(12)
    parts = []
    for batch, truth in batches(world, spec, 4, None, with_truth=True, request_rows=rows):
        mask = batch.candidate_mask.numpy()
        parts.append(truth[mask])
    counts = [world.candidate_rows(int(r)).stop - world.candidate_rows(int(r)).start for r in rows]
    predictions = {"request_rows": np.repeat(rows, counts), "truth": np.concatenate(parts)}
    full = recomputed_truth(world, predictions, cross_category=True)
    np.testing.assert_allclose(full, predictions["truth"], rtol=1e-4, atol=1e-6)
    within = recomputed_truth(world, predictions)
    np.testing.assert_array_equal(within[:, 0], full[:, 0])
    assert np.abs(within[:, 1:] - full[:, 1:]).max() > 1e-3


def test_windows_follow_the_units_seen():
    assert window(1700, CURVE_UNITS, 1) == (100, 200)
    assert window(1700, CURVE_UNITS, CUTS[-1]) == (1600, 1700)


@pytest.mark.slow
def test_curve_and_cross_end_to_end_on_tiny_worlds(tmp_path: Path):
    options = Options(
        seeds=(0,), workers=1, out=tmp_path / "results", worlds=tmp_path / "worlds",
        runs=tmp_path / "runs", presets=("tiny",), nets=("sim_hard", "ifa"),
        unit_users=8, cross_units=2,
    )  # fmt: skip
    report = curve(options)
    report.write(options.out)
    assert [int(k) for k in report.data["points"]] == list(CUTS)
    point = report.data["points"]["16"]
    assert set(point["metrics"]["ifa"]) == {"auc", "gauc", "gauc_click", "logloss", "ece"}
    assert (options.out / "curve.png").is_file() and "Target at 16×" in report.sections[2]
    cached = sorted(options.runs.rglob("metrics.json"))
    assert len(cached) == 2
    assert all(json.loads(p.read_text())["world_fingerprint"] for p in cached)
    stamps = [p.stat().st_mtime_ns for p in cached]
    curve(options)  # a second report reuses every run: the fingerprints match
    assert [p.stat().st_mtime_ns for p in cached] == stamps

    report = cross(options)
    assert set(report.data["worlds"]) == {"0.3", "1", "3", "10"}
    low = report.data["worlds"]["0.3"]
    assert low["other_oracles"]["oracle on same-category history"]["gauc"]["click"] > 0.5
    assert (
        "Target at α ≥ 3" in report.sections[2] and "**Ran:** 8 training runs" in report.sections[1]
    )


def test_the_plot_is_drawn_from_the_results_data_and_survives_a_collapsed_run(tmp_path):
    """curve.png is redrawn from curve.json's points; a run at chance (GAUC 0.5) is marked at the
    bottom instead of stretching the axis down to it."""
    from model.experiments.curve import CHANCE_GAUC, plot_curve

    def stat(mean: float) -> dict:
        return {"per_seed": [mean], "mean": mean, "ci": [mean - 0.01, mean + 0.01]}

    points = {
        str(seen): {
            "requests_seen": 100 * seen,
            "metrics": {
                "avgpool": {"gauc": {"click": stat(0.80 + 0.01 * seen)}},
                "ifa": {"gauc": {"click": stat(0.5 if seen == 4 else 0.85)}},
            },
            "oracle": {"gauc": {"click": 0.92}},
        }
        for seen in (1, 2, 4)
    }
    assert 0.5 <= CHANCE_GAUC < 0.8
    plot_curve(points, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").stat().st_size > 1000
