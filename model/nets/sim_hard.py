"""SIM with hard search: the GSU keeps the candidate's same-category events, most recent K.

Pi et al. (2020). The ESU is softmax target attention over that sub-sequence. Whatever the user
did outside the candidate's category, and every same-category event beyond the latest K, is lost
(the information loss IFA §1 argues about).

With ``mass_feature`` (``sim_hard_mass``) the towers also get log(1 + the number of the
candidate's same-category events in the whole history): production SIM serves that count from
its category index for free, and it is exactly what the top-K cut throws away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.batch import Batch
from model.features import RESERVED_ROWS, FeatureSpec
from model.layers import (
    InterestNet,
    MassFeature,
    NetConfig,
    SelectedTargetAttention,
    candidate_queries,
    most_recent_k,
)


@dataclass(frozen=True)
class SIMHardConfig(NetConfig):
    top_k: int = 50
    """K: length of each candidate's sub-sequence."""
    category_field: str = "category"
    use_ram: bool = False
    mass_feature: bool = False
    """Also feed log(1 + same-category count over the whole history) to the towers."""


@dataclass(frozen=True)
class SIMHardMassConfig(SIMHardConfig):
    mass_feature: bool = True


def same_category(event_category: Tensor, event_mask: Tensor, candidate_category: Tensor) -> Tensor:
    """Which real events share each candidate's category: (B, N), (B, N), (B, M) -> (B, M, N).

    Category rows below RESERVED_ROWS (padding, out-of-vocabulary) match nothing: an unknown
    category is not a category.
    """
    known = candidate_category >= RESERVED_ROWS  # (B, M)
    match = event_category[:, None, :] == candidate_category[:, :, None]
    return match & event_mask[:, None, :] & known[..., None]


class SIMHard(InterestNet):
    def __init__(self, spec: FeatureSpec, config: SIMHardConfig):
        super().__init__(spec, config)
        self.top_k = config.top_k
        event_names = [f.name for f in spec.event_fields]
        if config.category_field not in spec.item_names:
            raise ValueError(f"SIM-hard needs item field {config.category_field!r}")
        self.item_category_column = spec.item_names.index(config.category_field)
        self.event_category_column = event_names.index(config.category_field)
        self.attention = SelectedTargetAttention(self.query_dim, self.embeddings.event.dim, config)
        self.mass = MassFeature(config.interest_dim, 1) if config.mass_feature else None

    def eligible(self, batch: Batch) -> Tensor:
        """(B, M, N): which real events share each candidate's category."""
        return same_category(
            batch.events[..., self.event_category_column],
            batch.event_mask,
            batch.candidates[..., self.item_category_column],
        )

    def select(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """GSU: index and mask (B, M, K) of each candidate's most recent same-category events."""
        return most_recent_k(self.eligible(batch), self.top_k)

    def category_count(self, batch: Batch) -> Tensor:
        """(B, M): number of each candidate's same-category events in the whole history."""
        return self.eligible(batch).sum(dim=-1)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        index, mask = self.select(batch)
        queries = candidate_queries(user, candidates)
        attended = self.attention.attend_selected(queries, events, index, mask)
        if self.mass is None:
            return attended
        count = self.category_count(batch).to(attended.dtype)
        return self.mass(attended, torch.log1p(count)[..., None])
