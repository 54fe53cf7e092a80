"""Baselines and ablations: forward/backward, padding invariance, what each GSU selects."""

from __future__ import annotations

import math
from dataclasses import replace
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
    log_sum_exp_mass,
    masked_top_k,
    most_recent_k,
)
from model.loss import esmm_loss
from model.nets import NETS, build_net
from model.nets.din import DIN, ActivationUnit
from model.nets.sim_hard import SIMHard
from model.nets.twin import TWIN
from tests.factories import random_request, small_spec

BASELINES = [
    "avgpool", "din", "din_softmax", "sim_hard", "sim_hard_mass", "sim_soft", "twin",
    "twin_k100", "twin_k200", "twin_mass", "twin_k100_mass", "twin_k200_mass",
    "ifa_no_fsm", "ifa_no_fsm_ram", "ifa_no_degree", "ifa_no_ram",
]  # fmt: skip
# Small K and L so that the sequences below overflow them and selection really matters.
SMALL = {name: {"recent": 7} for name in ("din", "din_softmax")}
SMALL.update(
    {name: {"top_k": 5} for name in BASELINES if name.startswith(("twin", "sim_", "ifa_no_fsm"))}
)


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


# -- the published DIN and the "+mass" variants ----------------------------------------------


@pytest.mark.parametrize("name", [*BASELINES, "ifa"])
def test_candidates_permuted_permute_the_scores(name):
    """Every network scores a candidate set, not a sequence: reordering it reorders the scores."""
    net = small_net(name).eval()
    requests, batch = make_batch(small_spec(), [(30, 9), (12, 9)], seed=3)
    order = np.random.default_rng(0).permutation(9)
    requests = [replace(r, candidates=r.candidates[order], labels=r.labels) for r in requests]
    permuted = collate(requests, len(small_spec().event_fields), len(small_spec().item_fields))
    with torch.no_grad():
        torch.testing.assert_close(net(permuted), net(batch)[:, order], atol=1e-5, rtol=1e-5)


def _doubled(requests):
    """The same requests with every event twice (each copy right after the original)."""
    out = []
    for r in requests:
        twice = np.repeat(np.arange(len(r.event_times)), 2)
        out.append(replace(r, events=r.events[twice], event_times=r.event_times[twice]))
    spec = small_spec()
    return collate(out, len(spec.event_fields), len(spec.item_fields))


def _interest(net, batch):
    u = net.embeddings.user(batch.user)
    c = net.embeddings.item(batch.candidates)
    e = net.embeddings.event(batch.events)
    return net.interest(batch, u, c, e)


def test_published_din_keeps_the_intensity_that_softmax_normalises_away():
    """Every event twice (and all within L): the activation unit's unnormalised sum doubles,
    the softmax variant's weighted mean does not move."""
    requests, once = make_batch(small_spec(), [(3, 6)], seed=4)
    twice = _doubled(requests)
    din = small_net("din").eval()
    assert isinstance(din, DIN)
    with torch.no_grad():
        bias = din.value.bias
        torch.testing.assert_close(
            _interest(din, twice) - bias, 2 * (_interest(din, once) - bias), atol=1e-5, rtol=1e-4
        )
    softmax = small_net("din_softmax").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            _interest(softmax, twice), _interest(softmax, once), atol=1e-5, rtol=1e-4
        )


def test_activation_unit_equals_the_mlp_over_query_key_difference_product():
    torch.manual_seed(0)
    unit = ActivationUnit(query_dim=10, key_dim_in=7, width=5, hidden=(6, 4))
    queries, keys = torch.randn(2, 3, 10), torch.randn(2, 1, 4, 7)
    q = unit.query(queries)[:, :, None, :].expand(-1, -1, 4, -1)
    k = unit.key(keys).expand(-1, 3, -1, -1)
    direct = unit.rest(unit.first(torch.cat([q, k, q - k, q * k], dim=-1))).squeeze(-1)
    torch.testing.assert_close(unit(queries, keys), direct, atol=1e-5, rtol=1e-5)


def test_twin_mass_counts_the_whole_history():
    """The GSU mass is log Σ exp over all N events: every event twice adds exactly log 2,
    whatever K, while the top-K read is a share and the cut ignores everything past K."""
    requests, once = make_batch(small_spec(), [(40, 6), (0, 6)], seed=6)
    twice = _doubled(requests)
    net = small_net("twin_mass").eval()
    assert isinstance(net, TWIN)
    with torch.no_grad():
        masses = []
        for batch in (once, twice):
            u = net.embeddings.user(batch.user)
            c = net.embeddings.item(batch.candidates)
            e = net.embeddings.event(batch.events)
            scores = net.attention.sequence_scores(candidate_queries(u, c), e)
            masses.append(net.gsu_mass(batch, scores))
    torch.testing.assert_close(masses[1][0], masses[0][0] + math.log(2), atol=1e-4, rtol=1e-5)
    assert torch.all(masses[0][1] == 0) and torch.all(masses[1][1] == 0)  # empty history


def test_log_sum_exp_mass_by_hand():
    scores = torch.tensor([[0.0, math.log(3.0), 5.0]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(log_sum_exp_mass(scores, mask), torch.tensor([math.log(4.0)]))


def test_sim_hard_mass_is_the_same_category_count():
    requests, once = make_batch(small_spec(), [(40, 6)], seed=7)
    twice = _doubled(requests)
    net = small_net("sim_hard_mass").eval()
    assert isinstance(net, SIMHard)
    count = net.category_count(once)
    events = requests[0].events[:, net.event_category_column]
    cands = requests[0].candidates[:, net.item_category_column]
    expected = [int((events == c).sum()) if c >= RESERVED_ROWS else 0 for c in cands]
    assert count[0].tolist() == expected
    assert torch.equal(net.category_count(twice), 2 * count)
    assert max(expected) > 5  # beyond K: the count knows what the sub-sequence drops
