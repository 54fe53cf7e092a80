"""The two serving programs, unbatched: one user's events, one request's candidate set.

* :class:`ServingEncoder` — ``(events (N, F_event) int64, event_times (N,) float64,
  reference_time () float64) -> (S (H, dk, dv), z (H, dk))``, the additive state of those events.
* :class:`ServingScorer` — ``(user (F_user,) int64, candidates (M, F_item) int64, S, z) ->
  (probabilities (M, 1 + A), score (M,))`` where probabilities are p(impression) then
  p(action | impression) per action, and score = p(imp) · Σ_a w_a p(a | imp) with the fusion
  weights (default: click only, i.e. p(imp)·p(click | imp)).

They wrap the very modules the network trains, so exporting them cannot drift from training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from model.features import OBJECTIVES
from model.nets.ifa import IFA, CandidateScorer, SequenceEncoder

ACTION_OBJECTIVES: tuple[str, ...] = OBJECTIVES[1:]
DEFAULT_FUSION: dict[str, float] = {"click": 1.0}


def fusion_vector(weights: Mapping[str, float]) -> Tensor:
    """(A,) weights over the action objectives; unknown names are an error."""
    unknown = set(weights) - set(ACTION_OBJECTIVES)
    if unknown:
        raise ValueError(
            f"unknown fusion objectives {sorted(unknown)}; expected {ACTION_OBJECTIVES}"
        )
    return torch.tensor([float(weights.get(name, 0.0)) for name in ACTION_OBJECTIVES])


class ServingEncoder(nn.Module):
    def __init__(self, encoder: SequenceEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(
        self, events: Tensor, event_times: Tensor, reference_time: Tensor
    ) -> tuple[Tensor, Tensor]:
        mask = torch.ones_like(event_times, dtype=torch.bool)
        s, z = self.encoder(events[None], mask[None], event_times[None], reference_time.reshape(1))
        return s[0], z[0]


class ServingScorer(nn.Module):
    def __init__(self, scorer: CandidateScorer, fusion: Mapping[str, float] = DEFAULT_FUSION):
        super().__init__()
        self.scorer = scorer
        self.fusion: Tensor
        self.register_buffer("fusion", fusion_vector(fusion))

    def forward(
        self, user: Tensor, candidates: Tensor, s: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor]:
        mask = torch.ones(candidates.shape[:1], dtype=torch.bool, device=candidates.device)
        logits = self.scorer(user[None], candidates[None], mask[None], s[None], z[None])[0]
        probabilities = torch.sigmoid(logits)  # (M, 1 + A)
        score = probabilities[:, 0] * (probabilities[:, 1:] @ self.fusion)
        return probabilities, score


def serving_programs(
    net: IFA, fusion: Mapping[str, float] = DEFAULT_FUSION
) -> tuple[ServingEncoder, ServingScorer]:
    """The encoder and scorer of a trained IFA, in eval mode."""
    encoder, scorer = ServingEncoder(net.encoder), ServingScorer(net.scorer, fusion)
    return encoder.eval(), scorer.eval()
