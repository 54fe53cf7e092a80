"""TWIN: the GSU is the ESU's own attention, run light over the whole sequence.

Chang et al. (2023). Every event is scored with the ESU's query and key projections (mean over
heads); the top K go to the full multi-head target attention. GSU and ESU agree on relevance,
but the interactions outside the top K are still lost.

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
    NetConfig,
    SelectedTargetAttention,
    candidate_queries,
    masked_top_k,
)


@dataclass(frozen=True)
class TWINConfig(NetConfig):
    top_k: int = 50
    """K: length of each candidate's sub-sequence."""
    use_ram: bool = False


@dataclass(frozen=True)
class IFANoFSMConfig(TWINConfig):
    """IFA with FSM replaced by TWIN's two-step attention: RAM stays."""

    use_ram: bool = True


class TWIN(InterestNet):
    def __init__(self, spec: FeatureSpec, config: TWINConfig):
        super().__init__(spec, config)
        self.top_k = config.top_k
        self.attention = SelectedTargetAttention(self.query_dim, self.embeddings.event.dim, config)

    def select(self, batch: Batch, queries: Tensor, events: Tensor) -> tuple[Tensor, Tensor]:
        """GSU: index and mask (B, M, K) of the K events the light attention scores highest.

        queries (B, M, dq); events (B, N, de). Scores are the ESU's own (mean over heads). The
        choice passes no gradient, so the (B, H, M, N) scores are computed without a graph.
        """
        with torch.no_grad():
            scores = self.attention.sequence_scores(queries, events).mean(dim=1)  # (B, M, N)
        return masked_top_k(scores, batch.event_mask[:, None, :], self.top_k)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        queries = candidate_queries(user, candidates)
        index, mask = self.select(batch, queries, events)
        return self.attention.attend_selected(queries, events, index, mask)
