"""Which past events drove a score: IFA's read as explicit per-event attention weights.

The read of head h for a candidate is out_h = φ(q)ᵀS / (φ(q)ᵀz + ε) with S = Σ_j w_j φ(k_j) v_jᵀ
and z = Σ_j w_j φ(k_j) (w_j the decay weight, 1 without decay). Written per event,

    a_j = w_j · φ(q)ᵀφ(k_j)          (≥ 0, the event's unnormalised attention)
    degree = Σ_j a_j = φ(q)ᵀz         (the head's attention mass over the whole window)
    out_h = Σ_j (a_j / (degree + ε)) · v_j

so the weights a_j / (degree + ε) are exact, sum to degree / (degree + ε) ≈ 1, and reproduce the
read. Unlike a softmax over a top-K sub-sequence, they cover every event of the window. With the
exact-match channel φ is the extended φ', so a_j includes γ_h β_h · [a(q) = a(k_j)].

Shapes: H heads, N events, dk' key rows of the state (dk plus the channel's slots), dv value
dim; one user and one candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.linear_attention import DEFAULT_EPS, advance_state, decay_weights
from model.nets.ifa import IFA


@dataclass(frozen=True)
class HeadAttention:
    weights: Tensor  # (H, N) normalised: a_j / (degree + ε)
    degree: Tensor  # (H,) Σ_j a_j = φ(q)ᵀz
    values: Tensor  # (H, N, dv) v_j, so that (weights[..., None] * values).sum(1) is the read
    query: Tensor  # (H, dk) φ(q) of the candidate for this user


def served_decay_weights(
    event_times: Tensor, state_reference: float, request_time: float, decay_rates: Tensor
) -> Tensor:
    """(H, N) decay weights exactly as a served read applies them: events encoded relative to
    the state's reference time, then the state advanced to the request time when that is later
    (:func:`service.state.advance`). event_times (N,) float64; decay_rates (H,)."""
    reference = torch.tensor([state_reference], dtype=torch.float64)
    weights = decay_weights(event_times[None], reference, decay_rates)[0]  # (H, N)
    if request_time > state_reference and bool(torch.any(decay_rates != 0)):
        elapsed = torch.tensor([request_time - state_reference], dtype=torch.float64)
        # The factor advance_state multiplies the state by, applied to each event's weight.
        heads = len(decay_rates)
        unit = (torch.ones(1, heads, 1, 1), torch.ones(1, heads, 1))
        _, factor = advance_state(unit, elapsed, decay_rates)  # (1, H, 1)
        weights = weights * factor[0]
    return weights


def head_attention(
    net: IFA,
    user: Tensor,
    candidate: Tensor,
    events: Tensor,
    decay: Tensor,
    eps: float = DEFAULT_EPS,
) -> HeadAttention:
    """Per-event attention of each head for one candidate.

    user (F_user,), candidate (F_item,), events (N, F_event) int64 embedding rows; decay (H, N)
    from :func:`served_decay_weights`. Runs the network's own modules (eager), so the weights are
    those of the exported programs (verified against eager at export).
    """
    with torch.inference_mode():
        phi_keys, values = net.encoder.keys_values(events[None])  # (1, H, N, dk), (1, H, N, dv)
        scorer = net.scorer
        candidates = candidate[None, None]
        phi_query = scorer.query_features(
            scorer.user_embedding(user[None]),
            scorer.item_embedding(candidates),
            scorer.candidate_onehot(candidates),
        )[0, :, 0]  # (H, dk')
        attention = torch.einsum("hk,hnk->hn", phi_query, phi_keys[0]) * decay  # (H, N)
        degree = attention.sum(dim=1)
        return HeadAttention(attention / (degree[:, None] + eps), degree, values[0], phi_query)


def combined_weights(heads: HeadAttention) -> Tensor:
    """(N,) one weight per event over all heads: the mean of the heads' normalised weights (each
    head's sum to ≈ 1, so these do too); every head's read counts equally in the scorer input."""
    return heads.weights.mean(dim=0)
