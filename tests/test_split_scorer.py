"""The split scorer (item blocks from projected tables, user blocks once per request) gives the
reference scorer's answers: within 1e-5 in float32, for candidates of the catalogue, live-catalogue
items (an OOV id with known attributes) and unknown ids (every field OOV)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.features import OOV_INDEX, RESERVED_ROWS, FeatureSpec
from model.nets import build_net
from model.nets.ifa import IFA
from model.serving import serving_programs, split_programs
from model.split_scorer import SplitScorer
from tests.factories import live_channel, small_spec

NETS = ["ifa", "ifa_no_degree", "ifa_no_ram", "ifa_channel", "ifa_channel_decay"]


def trained_like(name: str) -> IFA:
    """A net whose every weight is non-trivial (biases and the channel's scales included), so
    no block of the split can be wrong and still agree."""
    torch.manual_seed(3)
    net = build_net(name, small_spec())
    assert isinstance(net, IFA)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    if net.config.channel_fields:
        live_channel(net)
    return net.eval()


def candidate_rows(spec: FeatureSpec, m: int, kind: str, seed: int) -> torch.Tensor:
    """(m, F_item) rows of one kind: "catalogue" (every field a trained row), "live" (the id
    OOV, the attributes known) or "unknown" (every field OOV)."""
    rng = np.random.default_rng(seed)
    columns = [rng.integers(RESERVED_ROWS, f.rows, m) for f in spec.item_fields]
    rows = np.stack(columns, axis=1)
    if kind in ("live", "unknown"):
        rows[:, 0] = OOV_INDEX
    if kind == "unknown":
        rows[:, :] = OOV_INDEX
    return torch.from_numpy(rows)


def request(spec: FeatureSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A user row and a state of 300 events."""
    rng = np.random.default_rng(seed)
    user = torch.from_numpy(
        np.array([rng.integers(RESERVED_ROWS, f.rows) for f in spec.user_fields])
    )
    events = torch.from_numpy(
        np.stack([rng.integers(RESERVED_ROWS, f.rows, 300) for f in spec.event_fields], axis=1)
    )
    times = torch.from_numpy(1.7e9 - np.sort(rng.uniform(0, 60 * 86400.0, 300))[::-1].copy())
    return user, events, times


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("kind", ["catalogue", "live", "unknown", "mixed"])
def test_split_scorer_equals_the_reference_in_float32(name: str, kind: str) -> None:
    net = trained_like(name)
    spec = small_spec()
    encoder, reference = serving_programs(net)
    _, split = split_programs(net)
    assert isinstance(split, SplitScorer) and split.has_tables  # the small spec's fields fit
    for seed in range(3):
        user, events, times = request(spec, seed)
        if kind == "mixed":
            parts = [candidate_rows(spec, 400, k, seed) for k in ("catalogue", "live", "unknown")]
            candidates = torch.cat(parts)[torch.randperm(1200)]
        else:
            candidates = candidate_rows(spec, 1000, kind, seed)
        with torch.no_grad():
            s, z = encoder(events, times, torch.tensor(1.7e9, dtype=torch.float64))
            want = reference(user, candidates, s, z)
            got = split(user, candidates, s, z)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert float((g - w).abs().max()) <= 1e-5


def test_tables_and_computed_item_blocks_agree_and_cover_every_row() -> None:
    """A field too large for the table budget is computed from its embedding rows instead; both
    give the same answer, for the highest row of every field too."""
    net = trained_like("ifa_channel_decay")
    spec = small_spec()
    encoder, reference = serving_programs(net)
    tabled = SplitScorer(net.scorer, reference.fusion).eval()
    computed = SplitScorer(net.scorer, reference.fusion, table_budget_bytes=0).eval()
    assert tabled.has_tables and not tabled.has_computed
    assert computed.has_computed and not computed.has_tables
    user, events, times = request(spec, 7)
    highest = torch.tensor([[f.rows - 1 for f in spec.item_fields]])
    candidates = torch.cat([candidate_rows(spec, 50, "catalogue", 7), highest])
    with torch.no_grad():
        s, z = encoder(events, times, torch.tensor(1.7e9, dtype=torch.float64))
        want = reference(user, candidates, s, z)[0]
        for scorer in (tabled, computed):
            assert float((scorer(user, candidates, s, z)[0] - want).abs().max()) <= 1e-5


def test_bf16_split_scorer_stays_within_bf16_rounding_of_the_reference() -> None:
    net = trained_like("ifa_channel_decay")
    spec = small_spec()
    encoder, reference = serving_programs(net)
    _, split = split_programs(net, precision="bf16")
    user, events, times = request(spec, 11)
    candidates = candidate_rows(spec, 1000, "catalogue", 11)
    with torch.no_grad():
        s, z = encoder(events, times, torch.tensor(1.7e9, dtype=torch.float64))
        want, _ = reference(user, candidates, s, z)
        got, _ = split(user, candidates, s, z)
    assert split.tower_pair.dtype == torch.bfloat16
    assert float((got - want).abs().max()) <= 1e-2


def test_an_export_with_the_split_scorer_ships_it_verified(tmp_path) -> None:
    """``--split-scorer``: both precisions' programs are the split scorer, checked against the
    network's scorer at export (TorchScript and torch.export), and the manifest says so."""
    from model.artifact import load_artifact
    from model.catalogue import Catalogue
    from model.checkpoint import Checkpoint
    from model.export import export_artifact

    net = trained_like("ifa_channel_decay")
    spec = small_spec()
    catalogue = Catalogue(
        {"item_id": np.arange(300), "category": np.arange(300) % 8, "author": np.arange(300) % 50},
        spec,
    )
    directory = export_artifact(
        Checkpoint("ifa_channel_decay", spec, net),
        catalogue,
        tmp_path,
        formats=("torchscript", "export"),
        precisions=("fp32", "bf16"),
        split_scorer=True,
    )
    model = load_artifact(directory, "torchscript", "fp32")
    assert model.manifest.scorer == "split"
    assert model.manifest.formats["export"]["max_abs_error"] <= 1e-5
    encoder, reference = serving_programs(net)
    user, events, times = request(spec, 5)
    rows, _ = catalogue.rows(np.array([3, 7, 299, 10_000]))  # 10,000: an unknown id
    candidates = torch.from_numpy(rows)
    with torch.no_grad():
        s, z = encoder(events, times, torch.tensor(1.7e9, dtype=torch.float64))
        want = reference(user, candidates, s, z)[0]
    got = model.score(user, candidates, s, z)[0]
    assert float((got - want).abs().max()) <= 1e-5
