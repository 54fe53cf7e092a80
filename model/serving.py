"""The two serving programs, unbatched: one user's events, one request's candidate set.

* :class:`ServingEncoder` — ``(events (N, F_event) int64, event_times (N,) float64,
  reference_time () float64) -> (S (H, dk, dv), z (H, dk))``, the additive state of those events.
* :class:`ServingScorer` — ``(user (F_user,) int64, candidates (M, F_item) int64, S, z) ->
  (probabilities (M, 1 + A), score (M,))`` where probabilities are p(impression) then
  p(action | impression) per action, and score = p(imp) · Σ_a w_a p(a | imp) with the fusion
  weights (default: the first action only, i.e. p(imp)·p(click | imp) in the default
  vocabulary).

They wrap the very modules the network trains, so exporting them cannot drift from training.

Precision: the scorer also comes in bf16 (:func:`bf16_scorer`), where the objective towers, most
of its arithmetic at M = 1,000, run in bfloat16. The encoder is fp32 only: its output is the
cached state every replica shares, whatever precision each scores in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from model.features import OBJECTIVES
from model.layers import BatchedLinear, Towers
from model.nets.ifa import IFA, CandidateScorer, SequenceEncoder
from model.split_scorer import SplitScorer


def default_fusion(objectives: Sequence[str] = OBJECTIVES) -> dict[str, float]:
    """The first action after impression alone: p(imp)·p(click | imp) in the default
    vocabulary."""
    return {objectives[1]: 1.0}


def fusion_vector(weights: Mapping[str, float], objectives: Sequence[str] = OBJECTIVES) -> Tensor:
    """(A,) weights over the action objectives (``objectives[1:]``); unknown names are an
    error."""
    actions = tuple(objectives[1:])
    unknown = set(weights) - set(actions)
    if unknown:
        raise ValueError(f"unknown fusion objectives {sorted(unknown)}; expected {list(actions)}")
    return torch.tensor([float(weights.get(name, 0.0)) for name in actions])


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
    def __init__(self, scorer: CandidateScorer, fusion: Mapping[str, float] | None = None):
        super().__init__()
        self.scorer = scorer
        objectives = scorer.head.objectives
        self.fusion: Tensor
        self.register_buffer(
            "fusion",
            fusion_vector(default_fusion(objectives) if fusion is None else fusion, objectives),
        )

    def forward(
        self, user: Tensor, candidates: Tensor, s: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor]:
        mask = torch.ones(candidates.shape[:1], dtype=torch.bool, device=candidates.device)
        logits = self.scorer(user[None], candidates[None], mask[None], s[None], z[None])[0]
        probabilities = torch.sigmoid(logits)  # (M, 1 + A)
        score = probabilities[:, 0] * (probabilities[:, 1:] @ self.fusion)
        return probabilities, score


class BFloat16(nn.Module):
    """A stack of dense layers run in bfloat16: its weights converted to bf16 (in place), the
    input rounded to bf16 once, the output handed back in float32.

    Casting the weights once is what makes it pay: autocast converts every weight on every
    call, which cost more than the bf16 matmuls saved (results/precision.md).
    """

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers.to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.to(torch.bfloat16)).to(torch.float32)


class FusedTowers(nn.Module):
    """:class:`model.layers.Towers` computed as one matmul for every tower's first layer and a
    batched matmul per later layer: the same arithmetic in a few large calls instead of one small
    call per tower and layer (the last layers are 64 -> 1 matmuls, mostly call overhead)."""

    def __init__(self, towers: Towers):
        super().__init__()
        stacks = towers.linears()
        self.count = len(stacks)
        self.first = nn.Linear(stacks[0][0].in_features, sum(s[0].out_features for s in stacks))
        with torch.no_grad():
            self.first.weight.copy_(torch.cat([s[0].weight for s in stacks]))
            self.first.bias.copy_(torch.cat([s[0].bias for s in stacks]))
        self.rest = nn.ModuleList(
            BatchedLinear([s[depth] for s in stacks]) for depth in range(1, len(stacks[0]))
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, M, in_dim) -> logits (B, M, towers), as :class:`model.layers.Towers`."""
        b, m = x.shape[0], x.shape[1]
        h = torch.relu(self.first(x.reshape(b * m, x.shape[2])))
        h = h.reshape(b * m, self.count, -1).transpose(0, 1)  # (T, B·M, hidden)
        last = len(self.rest) - 1
        for depth, layer in enumerate(self.rest):
            h = layer(h)
            if depth < last:
                h = torch.relu(h)
        return h[:, :, 0].transpose(0, 1).reshape(b, m, self.count)


def bf16_scorer(scorer: ServingScorer) -> ServingScorer:
    """A copy of ``scorer`` whose objective towers run in bfloat16 (fused: :class:`FusedTowers`).

    The towers are about 3/4 of the scorer's multiply-adds at M = 1,000 and only rank what they
    are given; the attention read, the degree, RAM and the final sigmoid and fusion stay in
    float32, so the state and the probabilities' scale are untouched. RAM's projections, the
    query and the FSM output in bf16 as well saved another 0.16 ms (6 %) of the AOTInductor
    scorer but tripled the largest probability difference on held-out requests (0.023) and
    lowered the worst top-50 overlap to 0.94: not taken.
    """
    low = copy.deepcopy(scorer)
    head = low.scorer.head
    assert isinstance(head.towers, Towers), "a scorer is made bf16 once, from fp32"
    head.towers = BFloat16(FusedTowers(head.towers))
    return low.eval()


def serving_programs(
    net: IFA, fusion: Mapping[str, float] | None = None, precision: str = "fp32"
) -> tuple[ServingEncoder, ServingScorer]:
    """The encoder and scorer of a trained IFA, in eval mode; ``precision`` ("fp32" or
    "bf16") is the scorer's."""
    encoder, scorer = ServingEncoder(net.encoder).eval(), ServingScorer(net.scorer, fusion).eval()
    if precision == "bf16":
        return encoder, bf16_scorer(scorer)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; expected 'fp32' or 'bf16'")
    return encoder, scorer


def split_programs(
    net: IFA, fusion: Mapping[str, float] | None = None, precision: str = "fp32"
) -> tuple[ServingEncoder, SplitScorer]:
    """:func:`serving_programs` with :class:`model.split_scorer.SplitScorer` as the scorer: the
    same arithmetic with its first layers split, the item blocks gathered from projected tables
    and the user blocks once per request."""
    encoder, scorer = serving_programs(net, fusion)
    return encoder, SplitScorer(net.scorer, scorer.fusion, precision).eval()
