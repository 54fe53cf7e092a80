"""IFA: full-sequence linear cross attention (FSM) + relation-aware module (RAM) + ESMM towers.

The network is the composition of two programs that are exported and served separately:

* :class:`SequenceEncoder` — events -> additive user state (S, z). A pure function of the event
  set and the weights, so the service caches it and folds new events in.
* :class:`CandidateScorer` — user, candidate set, state -> per-objective logits. Costs
  O(M·d²) whatever the history length.

Training runs ``scorer(encoder(events))``, so serving and training are the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.batch import Batch
from model.features import FeatureSpec
from model.layers import (
    CandidateHead,
    Embeddings,
    FieldEmbedding,
    NetConfig,
    merge_heads,
    split_heads,
)
from model.linear_attention import (
    DEFAULT_EPS,
    attention_degree,
    decay_weights,
    feature_map,
    read_state,
    state_contribution,
)

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class IFAConfig(NetConfig):
    use_fsm: bool = True
    """Always True for IFA; the ablation without FSM is a separate network (TWIN + RAM)."""
    fsm_feature_map: str = "relu"
    """Kernel φ of FSM's cross attention. relu can be exactly zero, so φ(q)ᵀφ(k) vanishes
    between unrelated items and the degree φ(q)ᵀz counts only the events that matter to q;
    elu+1 and softplus are > 0 everywhere, so with them every event adds to every degree."""
    time_decay: bool = False
    """Per-head exponential decay of old events, learned; keeps the fold property."""
    degree_feature: bool = True
    """Also feed log(1 + φ(q)ᵀz) per head to the towers (see CandidateScorer). False leaves
    only the normalised read of the paper's Eq. 6 (the ``ifa_no_degree`` ablation)."""
    eps: float = DEFAULT_EPS


@dataclass(frozen=True)
class IFANoDegreeConfig(IFAConfig):
    """IFA reading only the normalised attention (the paper's Eq. 6), without the degree."""

    degree_feature: bool = False


@dataclass(frozen=True)
class IFANoRAMConfig(IFAConfig):
    """IFA without its relation-aware module: candidates scored one by one."""

    use_ram: bool = False


class SequenceEncoder(nn.Module):
    """Behaviour events -> additive state contribution (S (B, H, dk, dv), z (B, H, dk))."""

    def __init__(self, event_embedding: FieldEmbedding, config: IFAConfig):
        super().__init__()
        self.heads = config.heads
        self.feature_map = config.fsm_feature_map
        self.time_decay = config.time_decay
        self.event_embedding = event_embedding
        self.key = nn.Linear(event_embedding.dim, config.heads * config.key_dim)
        self.value = nn.Linear(event_embedding.dim, config.heads * config.value_dim)
        # Softplus keeps rates positive; the initial value gives a half-life of about 30 days.
        self.decay_logit = nn.Parameter(torch.full((config.heads,), -3.8))
        self.seconds_per_day = SECONDS_PER_DAY

    def decay_rates(self) -> Tensor:
        """(H,) per-second decay rates; zeros when time decay is off."""
        if not self.time_decay:
            return torch.zeros_like(self.decay_logit)
        return F.softplus(self.decay_logit) / self.seconds_per_day

    def keys_values(self, events: Tensor) -> tuple[Tensor, Tensor]:
        """Each event's φ(k) (B, H, N, dk) and v (B, H, N, dv): its state contribution before
        the decay weight (also what /explain weighs events with)."""
        e = self.event_embedding(events)
        keys = feature_map(split_heads(self.key(e), self.heads), self.feature_map)
        return keys, split_heads(self.value(e), self.heads)

    def forward(
        self, events: Tensor, event_mask: Tensor, event_times: Tensor, reference_time: Tensor
    ) -> tuple[Tensor, Tensor]:
        """events (B, N, F_event), event_mask (B, N), event_times (B, N) and reference_time (B,)
        in unix seconds (float64). With decay, contributions are discounted to reference_time."""
        keys, values = self.keys_values(events)
        weights: Tensor | None = None
        if self.time_decay:
            weights = decay_weights(event_times, reference_time, self.decay_rates())
        return state_contribution(keys, values, event_mask, weights)


class CandidateScorer(nn.Module):
    """User, candidates and a cached state -> logits (B, M, n_objectives).

    The normalised read D⁻¹φ(Q)S is a weighted *mean* of values, blind to how much of the history
    is relevant. The degree φ(q)ᵀz that normalises it is that amount — the attention mass of the
    whole sequence on the candidate — so its log is kept as a feature per head. It comes free with
    the read, and no top-K sub-sequence can count past K (a softmax over K events reports shares,
    never counts). With a kernel that can be zero (relu) the degree counts only the events the
    head finds related to the candidate; with elu+1 it mostly counts the whole history.
    """

    def __init__(self, embeddings: Embeddings, config: IFAConfig):
        super().__init__()
        self.heads = config.heads
        self.feature_map = config.fsm_feature_map
        self.eps = config.eps
        self.degree_feature = config.degree_feature
        self.user_embedding = embeddings.user
        self.item_embedding = embeddings.item
        query_in = embeddings.item.dim + embeddings.user.dim
        self.query = nn.Linear(query_in, config.heads * config.key_dim)
        degree_dim = config.heads if config.degree_feature else 0
        self.fsm_out = nn.Linear(config.interest_dim + degree_dim, config.interest_dim)
        self.head = CandidateHead(
            embeddings.user.dim, embeddings.item.dim, config.interest_dim, config
        )

    def query_features(self, user_embedding: Tensor, candidate_embeddings: Tensor) -> Tensor:
        """φ(q) (B, H, M, dk) of embedded users (B, du) and candidates (B, M, di)."""
        expanded = user_embedding[:, None, :].expand(-1, candidate_embeddings.shape[1], -1)
        q_in = torch.cat([candidate_embeddings, expanded], dim=-1)
        return feature_map(split_heads(self.query(q_in), self.heads), self.feature_map)

    def forward(
        self, user: Tensor, candidates: Tensor, candidate_mask: Tensor, s: Tensor, z: Tensor
    ) -> Tensor:
        """user (B, F_user), candidates (B, M, F_item), candidate_mask (B, M), state (S, z)."""
        u = self.user_embedding(user)  # (B, du)
        c = self.item_embedding(candidates)  # (B, M, di)
        queries = self.query_features(u, c)
        parts = [merge_heads(read_state(queries, (s, z), self.eps))]
        if self.degree_feature:
            parts.append(torch.log1p(attention_degree(queries, z)).transpose(1, 2))  # (B, M, H)
        interest = self.fsm_out(torch.cat(parts, dim=-1))
        return self.head(u, c, interest, candidate_mask)


class IFA(nn.Module):
    """The training-time composition scorer(encoder(events))."""

    def __init__(self, spec: FeatureSpec, config: IFAConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(spec)
        self.encoder = SequenceEncoder(self.embeddings.event, config)
        self.scorer = CandidateScorer(self.embeddings, config)

    def forward(self, batch: Batch) -> Tensor:
        s, z = self.encoder(batch.events, batch.event_mask, batch.event_times, batch.request_time)
        return self.scorer(batch.user, batch.candidates, batch.candidate_mask, s, z)
