"""IFA's exact-match channel: the kernel identity, the state's exact counts, folding, decay, and
that γ = 0 is today's IFA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.batch import Request, collate
from model.explain import head_attention, served_decay_weights
from model.features import RESERVED_ROWS, default_spec
from model.linear_attention import (
    advance_state,
    attribute_onehot,
    feature_map,
    fold_in,
    fold_out,
    read_state,
    with_exact_match,
)
from model.nets import build_net
from model.nets.ifa import IFA
from tests.factories import live_channel, random_request, small_spec

CATEGORY_COLUMN = 1  # item fields: item_id, category, author


def channel_net(name: str = "ifa_channel", **overrides: object) -> IFA:
    torch.manual_seed(0)
    net = build_net(name, small_spec(), **overrides)
    assert isinstance(net, IFA)
    return live_channel(net).eval()


def one_request(n_events: int, n_candidates: int, seed: int = 0) -> Request:
    return random_request(small_spec(), np.random.default_rng(seed), n_events, n_candidates)


def encode(net: IFA, events: np.ndarray, times: np.ndarray, reference: float):
    """(S, z) of one user's events, (H, dk', dv) and (H, dk')."""
    with torch.no_grad():
        s, z = net.encoder(
            torch.from_numpy(events)[None],
            torch.ones(1, len(times), dtype=torch.bool),
            torch.from_numpy(times)[None],
            torch.tensor([reference], dtype=torch.float64),
        )
    return s[0], z[0]


def test_kernel_identity_adds_gamma_beta_on_exact_matches():
    generator = torch.Generator().manual_seed(0)
    b, h, m, n, dk, sizes = 2, 3, 5, 7, 4, [6]
    phi_q = feature_map(torch.randn(b, h, m, dk, generator=generator), "relu")
    phi_k = feature_map(torch.randn(b, h, n, dk, generator=generator), "relu")
    rows_q = torch.randint(0, 6 + RESERVED_ROWS, (b, m, 1), generator=generator)
    rows_k = torch.randint(0, 6 + RESERVED_ROWS, (b, n, 1), generator=generator)
    gamma, beta = torch.rand(h, generator=generator), torch.rand(h, generator=generator) + 0.5
    q = with_exact_match(phi_q, attribute_onehot(rows_q, sizes, RESERVED_ROWS), gamma)
    k = with_exact_match(phi_k, attribute_onehot(rows_k, sizes, RESERVED_ROWS), beta)
    got = torch.einsum("bhmk,bhnk->bhmn", q, k)
    # Padding and OOV rows (below RESERVED_ROWS) match nothing, not even each other.
    same = (rows_q[:, :, 0, None] == rows_k[:, None, :, 0]) & (rows_q[:, :, 0, None] >= 2)
    expected = (
        torch.einsum("bhmk,bhnk->bhmn", phi_q, phi_k)
        + (gamma * beta)[None, :, None, None] * same[:, None].float()
    )
    torch.testing.assert_close(got, expected)
    assert same.any() and (~same).any()


def test_a_wide_attribute_shares_slots_by_a_fixed_bucketing():
    rows = torch.tensor([[2, 5, 7, 1, 0, 12]])[..., None]  # (1, 6, 1) rows of one field
    onehot = attribute_onehot(rows, [5], RESERVED_ROWS)
    assert onehot.shape == (1, 6, 5)
    assert onehot[0].argmax(dim=-1)[:3].tolist() == [0, 3, 0]  # rows 2 and 7 share slot 0
    assert onehot[0, 3:5].sum() == 0  # OOV and padding
    assert onehot[0, 5].sum() == 1


def test_the_state_tail_is_the_exact_per_category_count():
    net = channel_net()
    request = one_request(60, 4)
    s, z = encode(net, request.events, request.event_times, request.request_time)
    channel = net.encoder.channel
    assert channel is not None
    dk = net.config.key_dim
    assert z.shape[-1] == dk + channel.width == net.encoder.state_key_dim
    categories = request.events[:, CATEGORY_COLUMN] - RESERVED_ROWS
    counts = np.bincount(categories, minlength=channel.width).astype(np.float32)
    tail = z[:, dk:] / channel.key_scale()[:, None].detach()
    for head in range(tail.shape[0]):
        np.testing.assert_allclose(tail[head].numpy(), counts, rtol=1e-5, atol=1e-5)
    # The tail rows of S are the per-category sums of the events' values, scaled by β.
    _, values = net.encoder.keys_values(torch.from_numpy(request.events)[None])
    with torch.no_grad():
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(categories), channel.width)
        sums = torch.einsum("nc,hnv->hcv", one_hot.float(), values[0])
        beta = channel.key_scale()[:, None, None]
        torch.testing.assert_close(s[:, dk:] / beta, sums, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ifa_channel", "ifa_channel_decay"])
def test_folds_fold_outs_and_decay_equal_a_one_shot_encode(name):
    net = channel_net(name)
    request = one_request(50, 3, seed=2)
    events, times = request.events, request.event_times
    middle, now = float(times[29]) + 1.0, request.request_time
    decay = net.encoder.decay_rates().detach()
    if name.endswith("decay"):
        assert bool((decay > 0).all())
    whole = encode(net, events, times, now)

    # Fold: the first 30 events encoded at an earlier reference, advanced to now, then the rest.
    early = encode(net, events[:30], times[:30], middle)
    elapsed = torch.tensor([now - middle], dtype=torch.float64)
    advanced = advance_state((early[0][None], early[1][None]), elapsed, decay)
    folded = fold_in((advanced[0][0], advanced[1][0]), encode(net, events[30:], times[30:], now))
    for got, expected in zip(folded, whole, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Fold-out: evicting the 10 oldest events leaves the encode of the other 40.
    evicted = fold_out(whole, encode(net, events[:10], times[:10], now))
    for got, expected in zip(evicted, encode(net, events[10:], times[10:], now), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gamma_zero_reproduces_ifa_exactly():
    spec = small_spec()
    torch.manual_seed(0)
    plain = build_net("ifa", spec).eval()
    assert isinstance(plain, IFA)
    torch.manual_seed(0)
    channel = build_net("ifa_channel", spec).eval()
    assert isinstance(channel, IFA) and channel.encoder.channel is not None
    # Every weight IFA has, the channel net has too (fsm_out with extra input columns).
    plain_weights = plain.state_dict()
    with torch.no_grad():
        for key, value in channel.state_dict().items():
            if key in plain_weights and value.shape == plain_weights[key].shape:
                value.copy_(plain_weights[key])
        width = plain.scorer.fsm_out.weight.shape[1]
        channel.scorer.fsm_out.weight[:, :width].copy_(plain.scorer.fsm_out.weight)
    assert float(channel.encoder.channel.query_scale().detach().abs().max()) == 0.0  # γ starts at 0
    assert float(channel.scorer.fsm_out.weight[:, width:].detach().abs().max()) == 0.0
    rng = np.random.default_rng(3)
    requests = [random_request(spec, rng, n, m) for n, m in [(40, 8), (0, 3), (7, 5)]]
    batch = collate(requests, len(spec.event_fields), len(spec.item_fields))
    with torch.no_grad():
        # Equal up to float summation order: the zero tail makes the reductions longer.
        torch.testing.assert_close(channel(batch), plain(batch), atol=1e-6, rtol=1e-6)


def test_gamma_gets_a_gradient_from_zero_and_stays_non_negative():
    spec = small_spec()
    torch.manual_seed(0)
    net = build_net("ifa_channel", spec)
    assert isinstance(net, IFA) and net.encoder.channel is not None
    rng = np.random.default_rng(0)
    requests = [random_request(spec, rng, 30, 6) for _ in range(3)]
    batch = collate(requests, len(spec.event_fields), len(spec.item_fields))
    net(batch).sum().backward()
    raw = net.encoder.channel.query_scale_raw
    assert raw.grad is not None and bool((raw.grad != 0).all())
    with torch.no_grad():
        raw.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    assert net.encoder.channel.query_scale().tolist() == [0.0, 0.0, 0.5, 2.0]


def test_the_channel_features_see_the_exact_same_category_count():
    """Two histories whose kernel reads agree but whose same-category counts differ must score
    differently once the channel is in use: the exact count reaches the towers."""
    net = channel_net()
    request = one_request(30, 1, seed=4)
    category = request.candidates[0, CATEGORY_COLUMN]
    other = category + 1 if category + 1 < 8 + RESERVED_ROWS else category - 1
    same, different = request.events.copy(), request.events.copy()
    same[:, CATEGORY_COLUMN] = category
    different[:, CATEGORY_COLUMN] = other
    user = torch.from_numpy(request.user)[None]
    candidates = torch.from_numpy(request.candidates)[None]
    mask = torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        scores = [
            net.scorer(
                user,
                candidates,
                mask,
                *(t[None] for t in encode(net, e, request.event_times, request.request_time)),
            )
            for e in (same, different)
        ]
    assert not torch.allclose(scores[0], scores[1])


def test_an_author_channel_hashes_into_its_slot_count_and_the_demo_state_fits_16_kib():
    torch.manual_seed(0)
    spec = small_spec()
    net = build_net("ifa_channel", spec, channel_fields=("category", "author"), channel_slots=16)
    assert isinstance(net, IFA) and net.encoder.channel is not None
    assert net.encoder.channel.sizes == [8, 16]  # 8 categories exact, 50 authors in 16 slots
    request = one_request(20, 5)
    _, z = encode(net, request.events, request.event_times, request.request_time)
    assert z.shape == (4, 16 + 8 + 16)
    # The demo world (the small preset: 16 categories) keeps its state within 16 KiB per user.
    demo = build_net("ifa_channel_decay", default_spec(n_categories=16))
    assert isinstance(demo, IFA)
    heads, dv = demo.config.heads, demo.config.value_dim
    assert 4 * heads * demo.encoder.state_key_dim * (dv + 1) <= 16 * 1024


def test_explained_weights_include_the_exact_match_term_and_reproduce_the_read():
    net = channel_net("ifa_channel_decay")
    request = one_request(40, 1, seed=6)
    events = torch.from_numpy(request.events)
    decay = served_decay_weights(
        torch.from_numpy(request.event_times),
        request.request_time,
        request.request_time,
        net.encoder.decay_rates().detach(),
    )
    user, candidate = torch.from_numpy(request.user), torch.from_numpy(request.candidates[0])
    attention = head_attention(net, user, candidate, events, decay)
    channel = net.encoder.channel
    assert channel is not None
    dk = net.config.key_dim
    with torch.no_grad():
        phi_keys, _ = net.encoder.keys_values(events[None])
        plain = torch.einsum("hk,hnk->hn", attention.query[:, :dk], phi_keys[0, :, :, :dk])
        same = torch.from_numpy(
            request.events[:, CATEGORY_COLUMN] == request.candidates[0, CATEGORY_COLUMN]
        )
        exact = (channel.query_scale() * channel.key_scale())[:, None] * same[None].float()
        expected = (plain + exact) * decay
    assert bool(same.any())
    unnormalised = attention.weights * (attention.degree[:, None] + net.config.eps)
    torch.testing.assert_close(unnormalised, expected, atol=1e-5, rtol=1e-5)
    # The weights sum to 1 (up to ε / degree) and reproduce the read of the state.
    torch.testing.assert_close(attention.weights.sum(dim=1), torch.ones(4), atol=1e-5, rtol=0.0)
    s, z = encode(net, request.events, request.event_times, request.request_time)
    read = read_state(attention.query[None, :, None, :], (s[None], z[None]), net.config.eps)
    weighted = (attention.weights[..., None] * attention.values).sum(dim=1)
    torch.testing.assert_close(weighted, read[0, :, 0], atol=1e-5, rtol=1e-5)
