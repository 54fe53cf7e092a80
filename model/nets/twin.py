"""TWIN: the GSU is the ESU's own attention, run light over the whole sequence.

Chang et al. (2023). Every event is scored with the ESU's query and key projections (mean over
heads); the top K go to the full multi-head target attention. GSU and ESU agree on relevance,
but the interactions outside the top K are still lost.

With ``mass_feature`` (the ``twin*_mass`` networks) the towers also get, per head, the
log-sum-exp of the GSU scores over *all* N events: the GSU computes those scores anyway, so the
whole-history attention mass costs one reduction; it is what a sub-sequence model can know about
how much of the history relates to the candidate (IFA's degree is the linear-attention analogue).

The same class is IFA's ablations (IFA §5.3): without FSM = this two-step attention plus RAM
(``ifa_no_fsm``); without FSM and RAM = TWIN itself (``ifa_no_fsm_ram``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.batch import Batch
from model.features import FeatureSpec
from model.layers import (
    InterestNet,
    MassFeature,
    NetConfig,
    SelectedTargetAttention,
    candidate_queries,
    log_sum_exp_mass,
    masked_top_k,
)


@dataclass(frozen=True)
class TWINConfig(NetConfig):
    top_k: int = 50
    """K: length of each candidate's sub-sequence."""
    use_ram: bool = False
    mass_feature: bool = False
    """Also feed log Σ_j exp(GSU score_j) over the whole history, per head, to the towers."""


# K sweep (the TWIN paper keeps more than 50) and the fair-information variants.
@dataclass(frozen=True)
class TWINK100Config(TWINConfig):
    top_k: int = 100


@dataclass(frozen=True)
class TWINK200Config(TWINConfig):
    top_k: int = 200


@dataclass(frozen=True)
class TWINMassConfig(TWINConfig):
    mass_feature: bool = True


@dataclass(frozen=True)
class TWINK100MassConfig(TWINMassConfig):
    top_k: int = 100


@dataclass(frozen=True)
class TWINK200MassConfig(TWINMassConfig):
    top_k: int = 200


@dataclass(frozen=True)
class IFANoFSMConfig(TWINConfig):
    """IFA with FSM replaced by TWIN's two-step attention: RAM stays."""

    use_ram: bool = True


class TWIN(InterestNet):
    def __init__(self, spec: FeatureSpec, config: TWINConfig):
        super().__init__(spec, config)
        self.top_k = config.top_k
        self.attention = SelectedTargetAttention(self.query_dim, self.embeddings.event.dim, config)
        self.mass = MassFeature(config.interest_dim, config.heads) if config.mass_feature else None

    def select(self, batch: Batch, queries: Tensor, events: Tensor) -> tuple[Tensor, Tensor]:
        """GSU: index and mask (B, M, K) of the K events the light attention scores highest.

        queries (B, M, dq); events (B, N, de). Scores are the ESU's own (mean over heads). The
        choice passes no gradient, so the (B, H, M, N) scores are computed without a graph.
        """
        with torch.no_grad():
            scores = self.attention.sequence_scores(queries, events)
        return self.select_from(batch, scores)

    def select_from(self, batch: Batch, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Top K of the GSU scores (B, H, M, N), mean over heads, among the real events."""
        mean = scores.detach().mean(dim=1)  # (B, M, N)
        return masked_top_k(mean, batch.event_mask[:, None, :], self.top_k)

    def gsu_mass(self, batch: Batch, scores: Tensor) -> Tensor:
        """Per head, log Σ_j exp(score_j) over every real event: (B, H, M, N) -> (B, M, H)."""
        return log_sum_exp_mass(scores, batch.event_mask[:, None, None, :]).transpose(1, 2)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        queries = candidate_queries(user, candidates)
        if self.mass is None:
            index, mask = self.select(batch, queries, events)
            return self.attention.attend_selected(queries, events, index, mask)
        # The mass is learned through the same scores the GSU ranks by, so keep their graph.
        scores = self.attention.sequence_scores(queries, events)
        index, mask = self.select_from(batch, scores)
        attended = self.attention.attend_selected(queries, events, index, mask)
        return self.mass(attended, self.gsu_mass(batch, scores))
