"""SIM with hard search: the GSU keeps the candidate's same-category events, most recent K.

Pi et al. (2020). The ESU is softmax target attention over that sub-sequence. Whatever the user
did outside the candidate's category, and every same-category event beyond the latest K, is lost
(the information loss IFA §1 argues about).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from model.batch import Batch
from model.features import RESERVED_ROWS, FeatureSpec
from model.layers import (
    InterestNet,
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

    def select(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """GSU: index and mask (B, M, K) of each candidate's most recent same-category events."""
        eligible = same_category(
            batch.events[..., self.event_category_column],
            batch.event_mask,
            batch.candidates[..., self.item_category_column],
        )
        return most_recent_k(eligible, self.top_k)

    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        index, mask = self.select(batch)
        queries = candidate_queries(user, candidates)
        return self.attention.attend_selected(queries, events, index, mask)
