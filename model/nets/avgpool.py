"""AvgPooling: the user's whole sequence as the masked mean of its event embeddings.

The shallowest baseline (IFA §5.1): one interest vector per request, the same for every
candidate, so any user-item interaction happens only in the towers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from model.batch import Batch
from model.features import FeatureSpec
from model.layers import InterestNet, NetConfig


@dataclass(frozen=True)
class AvgPoolConfig(NetConfig):
    use_ram: bool = False
    """Point-wise baseline: no relation-aware module."""


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, N, d), mask (B, N) -> (B, d); an empty sequence averages to zeros."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class AvgPool(InterestNet):
    def __init__(self, spec: FeatureSpec, config: AvgPoolConfig):
        super().__init__(spec, config)
        self.pool = nn.Linear(self.embeddings.event.dim, config.interest_dim)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        pooled = self.pool(masked_mean(events, batch.event_mask))  # (B, interest_dim)
        return pooled[:, None, :].expand(-1, candidates.shape[1], -1)
