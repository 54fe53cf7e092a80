"""DIN: softmax target attention from each candidate over the most recent L events.

The short-sequence state of the art (Zhou et al., 2018): deep user-item interaction, but
everything older than the last L behaviours is invisible to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from model.batch import Batch
from model.features import FeatureSpec
from model.layers import (
    InterestNet,
    NetConfig,
    SelectedTargetAttention,
    candidate_queries,
    most_recent_k,
)


@dataclass(frozen=True)
class DINConfig(NetConfig):
    recent: int = 50
    """L: how many of the latest events the attention sees."""
    use_ram: bool = False


class DIN(InterestNet):
    def __init__(self, spec: FeatureSpec, config: DINConfig):
        super().__init__(spec, config)
        self.recent = config.recent
        self.attention = SelectedTargetAttention(self.query_dim, self.embeddings.event.dim, config)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        # The same L events for every candidate: one (B, 1, L) selection, shared without copies.
        index, mask = most_recent_k(batch.event_mask[:, None, :], self.recent)
        queries = candidate_queries(user, candidates)
        return self.attention.attend_selected(queries, events, index, mask)
