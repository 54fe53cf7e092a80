"""SIM with soft search: the GSU keeps the top-K events by item-embedding inner product.

Pi et al. (2020). The GSU scores with the model's own item embeddings (shared with the
candidates and the ESU): the top-K choice passes no gradient, so separate GSU embeddings would
need SIM's auxiliary model to train, which changes more than the sequence module.
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
class SIMSoftConfig(NetConfig):
    top_k: int = 50
    """K: length of each candidate's sub-sequence."""
    use_ram: bool = False


def embedding_similarity(candidates: Tensor, event_items: Tensor) -> Tensor:
    """Inner products (B, M, N) of candidate (B, M, di) and event item (B, N, di) embeddings."""
    return torch.einsum("bmd,bnd->bmn", candidates, event_items)


class SIMSoft(InterestNet):
    def __init__(self, spec: FeatureSpec, config: SIMSoftConfig):
        super().__init__(spec, config)
        self.top_k = config.top_k
        # Event embeddings start with the event's item fields, looked up in the item tables.
        self.item_dim = self.embeddings.item.dim
        self.attention = SelectedTargetAttention(self.query_dim, self.embeddings.event.dim, config)

    def select(self, batch: Batch, candidates: Tensor, events: Tensor) -> tuple[Tensor, Tensor]:
        """GSU: index and mask (B, M, K) of each candidate's K most similar events."""
        with torch.no_grad():
            scores = embedding_similarity(candidates, events[..., : self.item_dim])
        return masked_top_k(scores, batch.event_mask[:, None, :], self.top_k)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        index, mask = self.select(batch, candidates, events)
        queries = candidate_queries(user, candidates)
        return self.attention.attend_selected(queries, events, index, mask)
