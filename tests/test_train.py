"""Streaming training end to end on the tiny world, in one process and under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.checkpoint import load_checkpoint
from model.data import load_world, save_world
from model.metrics import roc_auc
from model.train import TrainSettings, parse_args, rank_rows, summary_table, train
from model.world import generate_world

REPO = Path(__file__).resolve().parents[1]
FAST: dict[str, Any] = {"batch_size": 8, "lr": 1e-2, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("worlds") / "tiny-0"
    save_world(generate_world("tiny", 0), path)
    return path


def random_auc_std(labels: np.ndarray) -> float:
    """Standard deviation of the AUC of a random scorer (Mann–Whitney null distribution)."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


def test_rank_rows_split_every_global_batch_in_order():
    parts = [rank_rows(21, 8, rank, 2) for rank in range(2)]
    # Global batches [0..7], [8..15], [16..20]: each rank a contiguous half of each, in order.
    np.testing.assert_array_equal(parts[0], [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18])
    np.testing.assert_array_equal(parts[1], [4, 5, 6, 7, 12, 13, 14, 15, 19, 20])
    np.testing.assert_array_equal(rank_rows(21, 8, 0, 1), np.arange(21))
    # A last global batch smaller than the number of ranks is dropped, never split unevenly.
    assert len(rank_rows(17, 8, 1, 2)) == 8
    with pytest.raises(ValueError, match="multiple"):
        rank_rows(10, 7, 0, 2)


def test_tiny_world_trains_end_to_end_and_beats_a_random_scorer(tiny_world: Path, tmp_path: Path):
    out = tmp_path / "run"
    # Batch 4: about 75 updates on the tiny stream. IFA's log-degree inputs start large and
    # need a few dozen updates before they help; at batch 8 (37 updates) it is barely off random.
    settings = {**FAST, "batch_size": 4}
    result = train(TrainSettings(world=tiny_world, net="ifa", out=out, **settings))
    world = load_world(tiny_world)
    assert result.n_requests == world.n_requests
    assert result.n_eval_candidates == len(world.candidates["item_id"])
    assert result.predictions is not None
    labels = result.predictions.labels
    # Prequential AUC: every prediction was made before the batch was trained on.
    for i, name in enumerate(("impression", "click")):
        random_scores = np.random.default_rng(i).random(len(labels))
        assert abs(roc_auc(labels[:, i], random_scores) - 0.5) < 4 * random_auc_std(labels[:, i])
        assert result.auc[name] > 0.5 + 3 * random_auc_std(labels[:, i]), result.auc
    assert all(0.85 < result.oracle_auc[name] <= 1.0 for name in result.oracle_auc)
    losses = np.array(result.losses)
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:5].mean()
    assert result.samples_per_second > 0 and result.candidates_per_second > 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auc"] == pytest.approx(result.auc)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.net_name == "ifa"
    assert checkpoint.metadata["seed"] == 0
    assert checkpoint.metadata["world"] == str(tiny_world)
    assert checkpoint.metadata["auc"] == pytest.approx(result.auc)
    assert "samples_per_second" in checkpoint.metadata
    assert "| impression |" in summary_table(result)


def test_warmup_excludes_the_first_batches_from_evaluation(tiny_world: Path):
    settings = TrainSettings(world=tiny_world, net="avgpool", warmup=0.5, max_requests=80, **FAST)
    result = train(settings)
    assert result.predictions is not None
    # 10 batches of 8: the first 5 are trained on but not scored.
    assert result.predictions.request_rows.min() == 40
    assert len(result.losses) == 10


def test_burn_in_repeats_only_the_warmup_prefix(tiny_world: Path):
    settings = TrainSettings(
        world=tiny_world, net="avgpool", warmup=0.5, burn_in=2, max_requests=80, **FAST
    )
    result = train(settings)
    assert result.predictions is not None
    # Two extra passes over the 5 warm-up batches, then the 10-batch stream; the evaluated
    # requests are only those after the prefix, seen by the model for the first time.
    assert len(result.losses) == 2 * 5 + 10
    assert result.predictions.request_rows.min() == 40
    assert result.n_requests == 80


def test_cli_parses_net_overrides():
    settings = parse_args(
        ["--world", "w", "--net", "twin", "--set", "top_k=7", "use_ram=true", "--max-history", "9"]
    )
    assert settings.net_overrides == {"top_k": 7, "use_ram": True}
    assert settings.max_history == 9


def run_cli(args: list[str], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    subprocess.run(
        [*launcher, "-m", "model.train", *args], cwd=REPO, env=env, check=True, timeout=120,
        capture_output=True,
    )  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_processes_follow_the_single_process_run(tiny_world: Path, tmp_path: Path):
    common = ["--world", str(tiny_world), "--net", "ifa", "--batch-size", "8", "--lr", "1e-2"]
    common += ["--threads", "1", "--no-progress"]
    run_cli([*common, "--out", str(tmp_path / "one")], nproc=1)
    run_cli([*common, "--out", str(tmp_path / "two")], nproc=2)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    assert (tmp_path / "two" / "checkpoint.pt").is_file()
    # Same global batches in the same order; every tiny request has the same candidate count,
    # so the mean of the two ranks' gradients is the single-process gradient up to rounding,
    # except in the last, odd-sized global batch (its halves weigh equally): hence rtol.
    assert len(one["losses"]) == len(two["losses"])
    a, b = np.array(one["losses"]), np.array(two["losses"])
    for losses in (a, b):
        assert losses[-10:].mean() < losses[:5].mean()
    np.testing.assert_allclose(b, a, rtol=0.05)
    assert two["n_eval_candidates"] == one["n_eval_candidates"]
    for name, value in one["auc"].items():
        assert two["auc"][name] == pytest.approx(value, abs=0.02)
