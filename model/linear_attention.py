"""Linear attention with degree normalisation, as small pure functions.

Shapes: B batch, H heads, N keys (events), M queries (candidates), dk key dim, dv value dim.
The user state is the pair

    S = Σ_j w_j φ(k_j) v_jᵀ   (B, H, dk, dv)
    z = Σ_j w_j φ(k_j)        (B, H, dk)

and a query reads it as out = φ(q)ᵀS / (φ(q)ᵀz + ε), which is D⁻¹φ(Q)(φ(K)ᵀV) with
D = diag(φ(Q)φ(K)ᵀ1) (IFA Eq. 6–7). The weights w_j are 1, or exp(-λ_h (t_ref - t_j)) with
per-head time decay; either way the state is a sum over events, so events fold in and out.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

FeatureMapName = Literal["elu", "softplus", "relu"]
FEATURE_MAPS: tuple[str, ...] = ("elu", "softplus", "relu")
DEFAULT_EPS = 1e-6


def feature_map(x: Tensor, name: str = "elu") -> Tensor:
    """Non-negative kernel feature map φ (elu+1 by default)."""
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "softplus":
        return F.softplus(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError("unknown feature map " + name + "; expected elu, softplus or relu")


def decay_weights(event_times: Tensor, reference_time: Tensor, decay_rates: Tensor) -> Tensor:
    """Per-head event weights exp(-λ_h · (t_ref - t_j)).

    event_times (B, N) and reference_time (B,) in seconds (float64 keeps epoch precision);
    decay_rates (H,) per second. Returns (B, H, N) in decay_rates' dtype.
    """
    age = (reference_time[:, None] - event_times).to(decay_rates.dtype)  # (B, N)
    return torch.exp(-decay_rates[None, :, None] * age[:, None, :])


def state_contribution(
    phi_keys: Tensor, values: Tensor, mask: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Additive state (S, z) of a set of events.

    phi_keys (B, H, N, dk) already through φ; values (B, H, N, dv); mask (B, N), True for real
    events (padding adds nothing); weights (B, H, N) or None for unit weights.
    """
    w = mask[:, None, :].to(phi_keys.dtype).expand(-1, phi_keys.shape[1], -1)  # (B, H, N)
    if weights is not None:
        w = w * weights
    weighted_keys = phi_keys * w[..., None]  # (B, H, N, dk)
    s = torch.einsum("bhnk,bhnv->bhkv", weighted_keys, values)
    z = weighted_keys.sum(dim=2)
    return s, z


def fold_in(
    state: tuple[Tensor, Tensor], contribution: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Add events' contribution to a state."""
    return state[0] + contribution[0], state[1] + contribution[1]


def fold_out(
    state: tuple[Tensor, Tensor], contribution: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Remove events' contribution from a state (eviction undoes insertion)."""
    return state[0] - contribution[0], state[1] - contribution[1]


def advance_state(
    state: tuple[Tensor, Tensor], elapsed: Tensor, decay_rates: Tensor
) -> tuple[Tensor, Tensor]:
    """Move a decayed state's reference time forward by ``elapsed`` seconds (B,).

    S ← e^{-λΔt} S, z ← e^{-λΔt} z; with this, folding keeps working under decay.
    """
    factor = torch.exp(-decay_rates[None, :] * elapsed.to(decay_rates.dtype)[:, None])  # (B, H)
    return state[0] * factor[..., None, None], state[1] * factor[..., None]


def attention_degree(phi_queries: Tensor, z: Tensor) -> Tensor:
    """φ(q)ᵀz (B, H, M): each query's unnormalised attention mass over all events, i.e. the
    diagonal of D. phi_queries (B, H, M, dk), z (B, H, dk)."""
    return torch.einsum("bhmk,bhk->bhm", phi_queries, z)


def read_state(
    phi_queries: Tensor, state: tuple[Tensor, Tensor], eps: float = DEFAULT_EPS
) -> Tensor:
    """Degree-normalised read: φ(q)ᵀS / (φ(q)ᵀz + ε).

    phi_queries (B, H, M, dk); returns (B, H, M, dv). An empty state (S = 0, z = 0) reads as 0,
    never NaN: the denominator is at least ε because φ ≥ 0 and z ≥ 0.
    """
    s, z = state
    numerator = torch.einsum("bhmk,bhkv->bhmv", phi_queries, s)
    return numerator / (attention_degree(phi_queries, z)[..., None] + eps)


def explicit_attention(
    phi_queries: Tensor,
    phi_keys: Tensor,
    values: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """The O(M·N) reference D⁻¹ φ(Q)φ(K)ᵀ V, for tests and benchmarks. Returns (B, H, M, dv)."""
    scores = torch.einsum("bhmk,bhnk->bhmn", phi_queries, phi_keys)
    w = mask[:, None, None, :].to(scores.dtype)
    if weights is not None:
        w = w * weights[:, :, None, :]
    scores = scores * w
    return scores @ values / (scores.sum(dim=-1, keepdim=True) + eps)


# -- the exact-match channel ----------------------------------------------------------------
#
# φ'(x) = [φ(x) ; c_h · onehot(a(x))] on both sides, with c = β for keys and γ for queries, so
#
#     φ'(q)ᵀφ'(k) = φ(q)ᵀφ(k) + γ_h β_h · [a(q) = a(k)].
#
# The state stays a sum over events: the last C entries of z' are β_h times the user's (decayed)
# count of each attribute value, and the last C rows of S' β_h times the sums of their values.


def attribute_onehot(rows: Tensor, sizes: list[int], first_row: int) -> Tensor:
    """One-hot slots of F attributes side by side: rows (..., F) int64 embedding rows ->
    (..., Σ sizes) float. Attribute i's row r takes slot (r - first_row) mod sizes[i]: exact
    when the attribute has at most sizes[i] values, a fixed bucketing past that. Rows below
    ``first_row`` (padding, out-of-vocabulary) match nothing."""
    parts: list[Tensor] = []
    for i, size in enumerate(sizes):
        row = rows[..., i]
        slot = torch.remainder(row - first_row, size)
        slots = torch.arange(size, device=rows.device)
        hot = (slot[..., None] == slots) & (row >= first_row)[..., None]
        parts.append(hot.to(torch.float32))
    return torch.cat(parts, dim=-1)


def with_exact_match(phi: Tensor, onehot: Tensor, scale: Tensor) -> Tensor:
    """φ' = [φ ; scale_h · onehot]: phi (B, H, L, dk), onehot (B, L, C), scale (H,) ≥ 0 ->
    (B, H, L, dk + C). Non-negative when φ, onehot and scale are."""
    tail = scale[None, :, None, None] * onehot[:, None, :, :].to(phi.dtype)  # (B, H, L, C)
    return torch.cat([phi, tail], dim=-1)


def exact_match_read(
    onehot_queries: Tensor, state: tuple[Tensor, Tensor], key_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """What the channel's tail of the state says about each query's own attribute value.

    onehot_queries (B, M, C) one attribute's slots (one 1 per query, or none); state the tail
    (S (B, H, C, dv), z (B, H, C)) of that attribute; key_scale (H,) the β the keys carried.
    Returns the per-head count n of the user's events with the query's value (B, H, M), decayed
    like the state, and those events' values summed over n + 1 (B, H, M, dv): their mean shrunk
    towards 0 by one pseudo-event. The plain mean Σv / n would divide two float residues where
    folding events out has left a value's count at 0 (±1e-7), and return noise of any size.
    """
    s, z = state
    scale = key_scale[None, :, None]
    selected_mass = torch.einsum("bmc,bhc->bhm", onehot_queries, z)  # β_h · n
    selected_sum = torch.einsum("bmc,bhcv->bhmv", onehot_queries, s)  # β_h · Σv
    return selected_mass / scale, selected_sum / (selected_mass + scale)[..., None]
