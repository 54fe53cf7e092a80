"""DIN: target attention from each candidate over the most recent L events.

The short-sequence state of the art (Zhou et al., 2018): deep user-item interaction, but
everything older than the last L behaviours is invisible to it.

* ``din`` is the published form: the *activation unit*, an MLP over the query, the key, their
  difference and their element-wise product, gives each event a weight, and the weights are
  **not normalised** (no softmax), so the interest vector keeps the intensity of the user's
  interest — how many of the L events relate to the candidate, not only which share does.
* ``din_softmax`` is scaled-dot softmax attention over the same L events (the form this project
  used first), kept as a named variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn

from model.batch import Batch
from model.features import FeatureSpec
from model.layers import (
    InterestNet,
    NetConfig,
    SelectedTargetAttention,
    candidate_queries,
    gather_per_candidate,
    most_recent_k,
)


@dataclass(frozen=True)
class DINConfig(NetConfig):
    recent: int = 50
    """L: how many of the latest events the attention sees."""
    activation_hidden: tuple[int, ...] = (36,)
    """Hidden widths of the activation unit's MLP (the DIN paper's unit is one small MLP)."""
    use_ram: bool = False


@dataclass(frozen=True)
class DINSoftmaxConfig(NetConfig):
    recent: int = 50
    use_ram: bool = False


class ActivationUnit(nn.Module):
    """DIN's activation unit: weight(q, k) = MLP([q, k, q − k, q ⊙ k]), unnormalised.

    Query and key are first projected to a common width d. The first layer is linear in the
    concatenation, so W·[q, k, q − k, q ⊙ k] = (W_q + W_d) q + (W_k − W_d) k + W_p (q ⊙ k):
    the q and k parts are computed once per candidate and once per event, and only the product
    term is per pair (same function, a fraction of the work).
    """

    def __init__(self, query_dim: int, key_dim_in: int, width: int, hidden: tuple[int, ...]):
        super().__init__()
        if not hidden:
            raise ValueError("the activation unit needs at least one hidden layer")
        self.query = nn.Linear(query_dim, width)
        self.key = nn.Linear(key_dim_in, width)
        first = hidden[0]
        self.first = nn.Linear(4 * width, first)
        # One PReLU slope per layer: nn.PReLU's per-channel form reads dim 1, not the last.
        layers: list[nn.Module] = [nn.PReLU()]
        for h_in, h_out in pairwise(hidden):
            layers += [nn.Linear(h_in, h_out), nn.PReLU()]
        layers.append(nn.Linear(hidden[-1], 1))
        self.rest = nn.Sequential(*layers)
        self.width = width

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        """queries (B, M, dq), keys (B, M|1, L, de) -> weights (B, M, L), unnormalised."""
        q = self.query(queries)  # (B, M, d)
        k = self.key(keys)  # (B, M|1, L, d)
        w_q, w_k, w_d, w_p = self.first.weight.split(self.width, dim=1)
        pre = (
            (q @ (w_q + w_d).T)[:, :, None, :]
            + k @ (w_k - w_d).T
            + (q[:, :, None, :] * k) @ w_p.T
            + self.first.bias
        )
        return self.rest(pre).squeeze(-1)


class DIN(InterestNet):
    """The published DIN: Σ_j a(q, e_j) e_j over the latest L events, a from the activation unit."""

    def __init__(self, spec: FeatureSpec, config: DINConfig):
        super().__init__(spec, config)
        self.recent = config.recent
        event_dim = self.embeddings.event.dim
        self.attention = ActivationUnit(
            self.query_dim, event_dim, config.key_dim, config.activation_hidden
        )
        self.value = nn.Linear(event_dim, config.interest_dim)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        # The same L events for every candidate: one (B, 1, L) selection, shared without copies.
        index, mask = most_recent_k(batch.event_mask[:, None, :], self.recent)
        selected = gather_per_candidate(events, index)  # (B, 1, L, de)
        weights = self.attention(candidate_queries(user, candidates), selected)  # (B, M, L)
        weights = weights * mask.to(weights.dtype)
        pooled = torch.einsum("bml,ble->bme", weights, selected[:, 0])
        return self.value(pooled)


class DINSoftmax(InterestNet):
    """DIN with scaled-dot softmax target attention (weights sum to one: shares, not counts)."""

    def __init__(self, spec: FeatureSpec, config: DINSoftmaxConfig):
        super().__init__(spec, config)
        self.recent = config.recent
        self.attention = SelectedTargetAttention(self.query_dim, self.embeddings.event.dim, config)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        index, mask = most_recent_k(batch.event_mask[:, None, :], self.recent)
        queries = candidate_queries(user, candidates)
        return self.attention.attend_selected(queries, events, index, mask)
