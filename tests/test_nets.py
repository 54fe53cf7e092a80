"""Baselines and ablations: forward/backward, padding invariance, what each GSU selects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.batch import collate
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.features import RESERVED_ROWS
from model.layers import (
    LinearSelfAttention,
    NetConfig,
    SelectedTargetAttention,
    TargetAttention,
    candidate_queries,
    gather_per_candidate,
    masked_top_k,
    most_recent_k,
)
from model.loss import esmm_loss
from model.nets import NETS, build_net
from model.nets.sim_hard import SIMHard
from model.nets.twin import TWIN
from tests.factories import random_request, small_spec

BASELINES = [
    "avgpool", "din", "sim_hard", "sim_soft", "twin",
    "ifa_no_fsm", "ifa_no_fsm_ram", "ifa_no_degree",
]  # fmt: skip
# Small K and L so that the sequences below overflow them and selection really matters.
SMALL = {"din": {"recent": 7}, "sim_hard": {"top_k": 5}, "sim_soft": {"top_k": 5}}
SMALL.update({name: {"top_k": 5} for name in ("twin", "ifa_no_fsm", "ifa_no_fsm_ram")})


def make_batch(spec, shapes, seed=0):
    rng = np.random.default_rng(seed)
    requests = [random_request(spec, rng, n, m) for n, m in shapes]
    return requests, collate(requests, len(spec.event_fields), len(spec.item_fields))


def small_net(name: str):
    torch.manual_seed(0)
    return build_net(name, small_spec(), **SMALL.get(name, {}))


def test_registry_holds_every_network():
    assert set(BASELINES) | {"ifa"} <= set(NETS)


@pytest.mark.parametrize("name", [*BASELINES, "ifa"])
def test_forward_and_backward(name):
    net = small_net(name)
    _, batch = make_batch(small_spec(), [(40, 6), (0, 3), (3, 9)])
    logits = net(batch)
    assert logits.shape == (3, 9, 4)
    assert torch.isfinite(logits).all()
    assert batch.labels is not None
    esmm_loss(logits, batch.labels, batch.candidate_mask).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The sequence module learns: some attention/pooling weight received a non-zero gradient.
    sequence_grads = [
        p.grad.abs().sum()
        for n, p in net.named_parameters()
        if p.grad is not None and n.split(".")[0] in ("attention", "pool", "encoder")
    ]
    assert sum(sequence_grads) > 0


@pytest.mark.parametrize("name", BASELINES)
def test_padded_events_and_candidates_change_nothing_for_real_ones(name):
    net = small_net(name).eval()
    spec = small_spec()
    _, alone = make_batch(spec, [(30, 6)])
    _, padded = make_batch(spec, [(30, 6), (200, 40)])  # first request padded to N=200, M=40
    with torch.no_grad():
        torch.testing.assert_close(net(padded)[0, :6], net(alone)[0], atol=1e-5, rtol=1e-5)


def test_ram_only_in_the_ablation_that_keeps_it():
    assert small_net("ifa_no_fsm").head.use_ram
    assert not small_net("ifa_no_fsm_ram").head.use_ram
    assert not small_net("twin").head.use_ram


@pytest.mark.parametrize("name", ["sim_hard", "twin", "ifa_no_fsm"])
def test_checkpoint_round_trip(name, tmp_path: Path):
    net = small_net(name).eval()
    _, batch = make_batch(small_spec(), [(25, 7)])
    save_checkpoint(Checkpoint(name, small_spec(), net), tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded.net.config == net.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(batch), net(batch))


# -- selection ---------------------------------------------------------------------------


def test_masked_top_k_never_selects_ineligible_and_masks_the_shortfall():
    scores = torch.tensor([[[5.0, 9.0, 1.0, 7.0, 3.0]]])
    eligible = torch.tensor([[[True, False, True, False, True]]])
    index, mask = masked_top_k(scores, eligible, 4)
    chosen = {int(i) for i, ok in zip(index[0, 0], mask[0, 0], strict=True) if ok}
    assert chosen == {0, 2, 4}
    assert int(mask.sum()) == 3


def test_most_recent_k_takes_the_latest_real_events():
    eligible = torch.tensor([[[True, True, False, True, True, False]]])
    index, mask = most_recent_k(eligible, 2)
    assert sorted(int(i) for i in index[0, 0][mask[0, 0]]) == [3, 4]


def test_sim_hard_keeps_only_the_most_recent_same_category_events():
    spec = small_spec()
    net = small_net("sim_hard")
    assert isinstance(net, SIMHard)
    _, batch = make_batch(spec, [(80, 10), (12, 4)], seed=3)
    index, mask = net.select(batch)
    assert index.shape == (2, 10, 5)
    event_cat = batch.events[..., net.event_category_column]
    cand_cat = batch.candidates[..., net.item_category_column]
    for b in range(2):
        for m in range(10):
            if not batch.candidate_mask[b, m]:
                assert not mask[b, m].any()
                continue
            same = [
                j
                for j in range(batch.events.shape[1])
                if batch.event_mask[b, j] and event_cat[b, j] == cand_cat[b, m]
            ]
            assert cand_cat[b, m] >= RESERVED_ROWS
            chosen = sorted(int(j) for j in index[b, m][mask[b, m]])
            assert chosen == same[-5:]  # oldest first, so the last five are the most recent


def test_twin_top_k_equals_brute_force():
    spec = small_spec()
    net = small_net("twin")
    assert isinstance(net, TWIN)
    _, batch = make_batch(spec, [(60, 8), (9, 8)], seed=5)
    with torch.no_grad():
        u = net.embeddings.user(batch.user)
        c = net.embeddings.item(batch.candidates)
        e = net.embeddings.event(batch.events)
        queries = candidate_queries(u, c)
        index, mask = net.select(batch, queries, e)
        # Brute force: the ESU's own TargetAttention.scores on the raw events, every candidate.
        scores = TargetAttention.scores(net.attention, queries, e[:, None])
        torch.testing.assert_close(net.attention.sequence_scores(queries, e), scores)
        scores = scores.mean(dim=1)
    for b in range(2):
        real = torch.nonzero(batch.event_mask[b]).flatten()
        for m in range(8):
            order = real[torch.argsort(scores[b, m, real], descending=True)]
            expected = sorted(int(j) for j in order[:5])
            assert sorted(int(j) for j in index[b, m][mask[b, m]]) == expected


def test_selected_attention_equals_target_attention_on_gathered_events():
    torch.manual_seed(0)
    net = small_net("twin")
    attention = net.attention
    assert isinstance(attention, SelectedTargetAttention)
    b, m, n, k = 2, 5, 30, 6
    queries = torch.randn(b, m, net.query_dim)
    events = torch.randn(b, n, net.embeddings.event.dim)
    index = torch.randint(0, n, (b, m, k))
    mask = torch.rand(b, m, k) > 0.3
    mask[0, 0] = False  # a candidate with nothing selected reads zeros
    fast = attention.attend_selected(queries, events, index, mask)
    slow = attention(queries, gather_per_candidate(events, index), mask)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.all(fast[0, 0] == 0)
    # A selection shared by all candidates (DIN's (B, 1, L)) equals the expanded one.
    shared = attention.attend_selected(queries, events, index[:, :1], mask[:, :1])
    expanded = attention.attend_selected(
        queries, events, index[:, :1].expand(-1, m, -1), mask[:, :1].expand(-1, m, -1)
    )
    torch.testing.assert_close(shared, expanded)


@pytest.mark.parametrize("ram_degree", [False, True], ids=["normalised-read", "degree"])
def test_ram_degree_counts_rivals_that_the_normalised_read_averages_away(ram_degree):
    """A candidate set with every candidate twice: the normalised read of RAM (a weighted mean
    over the set) is unchanged, while its log degree grows by log((1 + 2d) / (1 + d))."""
    torch.manual_seed(0)
    ram = LinearSelfAttention(12, NetConfig(ram_degree=ram_degree))
    x = torch.randn(1, 7, 12)
    mask = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        once = ram(x, mask)
        twice = ram(torch.cat([x, x], dim=1), torch.cat([mask, mask], dim=1))[:, :7]
    read = NetConfig().interest_dim
    torch.testing.assert_close(twice[..., :read], once[..., :read], atol=1e-5, rtol=1e-5)
    assert once.shape[-1] == read + (NetConfig().heads if ram_degree else 0)
    if ram_degree:
        d = torch.expm1(once[..., read:])
        torch.testing.assert_close(twice[..., read:], torch.log1p(2 * d), atol=1e-5, rtol=1e-5)
