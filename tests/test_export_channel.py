"""The exported programs of IFA with the exact-match channel: TorchScript, torch.export,
AOTInductor and the bf16 scorer carry the channel and agree with the eager network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import LATEST_FILE, Manifest, load_artifact
from model.checkpoint import Checkpoint
from model.export import export_artifact
from model.nets import build_net
from model.nets.ifa import IFA
from model.serving import ServingEncoder, ServingScorer, serving_programs
from tests.factories import live_channel
from tests.test_export import (
    FAST_FORMATS,
    SPEC,
    assert_matches_eager,
    make_catalogue,
    make_checkpoint,
)

SIZES = ((0, 1), (1, 7), (500, 64))


def channel_checkpoint() -> Checkpoint:
    torch.manual_seed(0)
    net = build_net("ifa_channel_decay", SPEC, tower_hidden=[32, 16])
    assert isinstance(net, IFA)
    live_channel(net)
    return Checkpoint("ifa_channel_decay", SPEC, net, {"seed": 0})


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return channel_checkpoint()


@pytest.fixture(scope="module")
def reference(checkpoint: Checkpoint) -> tuple[ServingEncoder, ServingScorer]:
    assert isinstance(checkpoint.net, IFA)
    return serving_programs(checkpoint.net)


@pytest.fixture(scope="module")
def export_root(checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("channel-artifacts")
    export_artifact(
        checkpoint,
        make_catalogue(),
        root,
        formats=("torchscript", "export"),
        precisions=("fp32", "bf16"),
    )
    return root


@pytest.mark.parametrize("program_format", FAST_FORMATS)
def test_programs_with_the_channel_match_eager(
    export_root: Path, reference: tuple[ServingEncoder, ServingScorer], program_format: str
) -> None:
    model = load_artifact(export_root, program_format)
    for n, m in SIZES:
        assert_matches_eager(model, reference, n, m)


def test_manifest_states_the_channel_and_the_state_size(
    export_root: Path, checkpoint: Checkpoint
) -> None:
    directory = export_root / (export_root / LATEST_FILE).read_text().strip()
    manifest = Manifest.load(directory / "manifest.json")
    assert manifest.net == "ifa_channel_decay"
    assert manifest.channel == {"fields": ["category"], "slots": [8]}
    assert manifest.key_dim == 16 + 8  # rows of S: key dim + one slot per category
    assert manifest.state_tensor_bytes == 4 * 4 * 24 * 17
    assert all(r > 0 for r in manifest.decay_rates)
    # The bf16 scorer was verified against eager bf16 at export and keeps the channel's read.
    assert manifest.formats["torchscript"]["bf16_max_abs_error"] <= 1e-2
    model = load_artifact(export_root, "torchscript", "bf16")
    state = model.encode(*_history())
    user, candidates = torch.from_numpy(np.array([2, 2, 2, 2])), _candidates()
    probabilities, _ = model.score(user, candidates, *state)
    fp32 = load_artifact(export_root, "torchscript").score(user, candidates, *state)[0]
    assert torch.allclose(probabilities, fp32, atol=2e-2)


def _history() -> tuple[torch.Tensor, torch.Tensor, float]:
    rows = SPEC.item_rows(
        {"item_id": np.arange(30) * 3, "category": np.arange(30) % 8, "author": np.arange(30)}
    )
    times = 1.7e9 + np.arange(30, dtype=np.float64) * 60.0
    events = SPEC.event_rows(rows, np.zeros(30, dtype=np.int64), times)
    return torch.from_numpy(events), torch.from_numpy(times), 1.7e9 + 3600.0


def _candidates() -> torch.Tensor:
    ids = np.arange(8) * 3
    return torch.from_numpy(SPEC.item_rows({"item_id": ids, "category": ids % 8, "author": ids}))


@pytest.mark.slow
def test_aoti_programs_with_the_channel_match_eager(
    checkpoint: Checkpoint,
    reference: tuple[ServingEncoder, ServingScorer],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("channel-aoti")
    export_artifact(checkpoint, make_catalogue(), root, formats=("aoti",))
    directory = root / (root / LATEST_FILE).read_text().strip()
    status = Manifest.load(directory / "manifest.json").formats["aoti"]
    assert status["status"] == "ok", status
    model = load_artifact(root, "aoti")
    for n, m in SIZES:
        assert_matches_eager(model, reference, n, m)


def test_the_channel_gives_states_a_version_of_their_own(export_root: Path, tmp_path: Path) -> None:
    """A rollout between IFA and IFA with the channel must not reuse cached states: their rows
    differ in number and meaning."""
    plain_root = tmp_path / "plain"
    export_artifact(make_checkpoint(), make_catalogue(), plain_root, formats=("torchscript",))
    versions = [
        Manifest.load(root / (root / LATEST_FILE).read_text().strip() / "manifest.json")
        for root in (export_root, plain_root)
    ]
    assert versions[0].state_version and versions[1].state_version
    assert versions[0].state_version != versions[1].state_version
    assert versions[0].key_dim != versions[1].key_dim
