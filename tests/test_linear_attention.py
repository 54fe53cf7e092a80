"""The linear-attention state: exact reads, folding, eviction and decay."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.linear_attention import (
    FEATURE_MAPS,
    advance_state,
    decay_weights,
    explicit_attention,
    feature_map,
    fold_in,
    fold_out,
    read_state,
    state_contribution,
)


@pytest.fixture(autouse=True)
def float64_by_default():
    """Exactness checks run in float64; the float32 test below states its own tolerance."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_inputs(seed: int, b: int, h: int, m: int, n: int, dk: int, dv: int, name: str = "elu"):
    g = torch.Generator().manual_seed(seed)
    q = feature_map(torch.randn(b, h, m, dk, generator=g), name)
    k = feature_map(torch.randn(b, h, n, dk, generator=g), name)
    v = torch.randn(b, h, n, dv, generator=g)
    mask = torch.rand(b, n, generator=g) > 0.3
    return q, k, v, mask


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 3),
    h=st.integers(1, 4),
    m=st.integers(1, 9),
    n=st.integers(0, 40),
    dk=st.integers(1, 8),
    dv=st.integers(1, 8),
    name=st.sampled_from(FEATURE_MAPS),
)
def test_state_read_equals_explicit_attention(seed, b, h, m, n, dk, dv, name):
    q, k, v, mask = random_inputs(seed, b, h, m, n, dk, dv, name)
    fast = read_state(q, state_contribution(k, v, mask))
    slow = explicit_attention(q, k, v, mask)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_float32_read_matches_explicit_at_serving_sizes():
    q, k, v, mask = random_inputs(0, 2, 4, 300, 2000, 16, 16)
    q, k, v = q.float(), k.float(), v.float()
    torch.testing.assert_close(
        read_state(q, state_contribution(k, v, mask)),
        explicit_attention(q, k, v, mask),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_empty_history_reads_finite_zeros(name):
    q, k, v, _ = random_inputs(1, 2, 2, 5, 0, 4, 3, name)
    empty = torch.zeros(2, 0, dtype=torch.bool)
    out = read_state(q, state_contribution(k, v, empty))
    assert torch.isfinite(out).all() and (out == 0).all()
    q, k, v, _ = random_inputs(1, 2, 2, 5, 7, 4, 3, name)
    all_padding = torch.zeros(2, 7, dtype=torch.bool)
    out = read_state(q, state_contribution(k, v, all_padding))
    assert torch.isfinite(out).all() and (out == 0).all()


def test_feature_maps_are_non_negative_and_unknown_is_rejected():
    x = torch.linspace(-30, 30, 101)
    for name in FEATURE_MAPS:
        assert (feature_map(x, name) >= 0).all()
    with pytest.raises(ValueError, match="feature map"):
        feature_map(x, "tanh")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), chunk=st.integers(1, 7))
def test_folding_one_by_one_in_chunks_and_at_once_agree(seed, n, chunk):
    _, k, v, _ = random_inputs(seed, 1, 2, 1, n, 4, 3)
    mask = torch.ones(1, n, dtype=torch.bool)
    at_once = state_contribution(k, v, mask)
    one_by_one = (torch.zeros_like(at_once[0]), torch.zeros_like(at_once[1]))
    for j in range(n):
        one_by_one = fold_in(
            one_by_one,
            state_contribution(k[:, :, j : j + 1], v[:, :, j : j + 1], mask[:, j : j + 1]),
        )
    chunked = (torch.zeros_like(at_once[0]), torch.zeros_like(at_once[1]))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        chunked = fold_in(chunked, state_contribution(k[:, :, sl], v[:, :, sl], mask[:, sl]))
    for state in (one_by_one, chunked):
        torch.testing.assert_close(state[0], at_once[0])
        torch.testing.assert_close(state[1], at_once[1])


def test_subtracting_an_event_undoes_adding_it():
    _, k, v, _ = random_inputs(3, 2, 3, 1, 20, 5, 4)
    mask = torch.ones(2, 20, dtype=torch.bool)
    base = state_contribution(k[:, :, :19], v[:, :, :19], mask[:, :19])
    event = state_contribution(k[:, :, 19:], v[:, :, 19:], mask[:, 19:])
    restored = fold_out(fold_in(base, event), event)
    torch.testing.assert_close(restored[0], base[0])
    torch.testing.assert_close(restored[1], base[1])


def test_decay_matches_explicit_per_event_weights_and_keeps_folding():
    _, k, v, _ = random_inputs(4, 1, 3, 1, 12, 4, 4)
    q, _, _, _ = random_inputs(5, 1, 3, 6, 1, 4, 4)
    mask = torch.ones(1, 12, dtype=torch.bool)
    times = torch.sort(torch.rand(1, 12) * 1e6).values + 1.7e9
    rates = torch.tensor([1e-6, 1e-5, 3e-7])
    t_ref = torch.tensor([1.7e9 + 1.5e6])
    weights = decay_weights(times, t_ref, rates)  # (1, 3, 12)
    expected_weights = torch.exp(-rates[None, :, None] * (t_ref - times)[:, None, :])
    torch.testing.assert_close(weights, expected_weights)
    decayed = state_contribution(k, v, mask, weights)
    explicit_s = torch.einsum("bhn,bhnk,bhnv->bhkv", expected_weights, k, v)
    torch.testing.assert_close(decayed[0], explicit_s)
    torch.testing.assert_close(
        read_state(q, decayed), explicit_attention(q, k, v, mask, expected_weights)
    )
    # Fold the first 8 events at t_mid, advance the state to t_ref, then fold the last 4.
    t_mid = times[:, 7]
    first = state_contribution(
        k[:, :, :8], v[:, :, :8], mask[:, :8], decay_weights(times[:, :8], t_mid, rates)
    )
    advanced = advance_state(first, t_ref - t_mid, rates)
    last = state_contribution(
        k[:, :, 8:], v[:, :, 8:], mask[:, 8:], decay_weights(times[:, 8:], t_ref, rates)
    )
    folded = fold_in(advanced, last)
    torch.testing.assert_close(folded[0], decayed[0])
    torch.testing.assert_close(folded[1], decayed[1])
