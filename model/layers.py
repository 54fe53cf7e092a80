"""Blocks shared by every network: embeddings, attention modules, towers.

The networks differ only in how they turn the behaviour sequence into a per-candidate interest
vector; embeddings, the relation-aware module and the ESMM towers are these same classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.batch import Batch
from model.features import OBJECTIVES, PADDING_INDEX, FeatureSpec, Field
from model.linear_attention import (
    DEFAULT_EPS,
    attention_degree,
    feature_map,
    read_state,
    state_contribution,
)


@dataclass(frozen=True)
class NetConfig:
    """Sizes every network shares; each network's own config extends it."""

    heads: int = 4
    key_dim: int = 16
    value_dim: int = 16
    tower_hidden: tuple[int, ...] = (128, 64)
    feature_map: str = "elu"
    """Kernel φ of RAM's linear self-attention among the candidates (IFA's FSM has its own)."""
    use_ram: bool = True
    ram_degree: bool = False
    """RAM also reports log(1 + φ(q)ᵀΣφ(k)) per head: how much of the candidate set each
    candidate's query finds related (with relu, a count of related rivals). Off by default: on
    the medium world it made IFA worse (results/design_sweeps.md)."""

    @property
    def interest_dim(self) -> int:
        return self.heads * self.value_dim


class FieldEmbedding(nn.Module):
    """Concatenated embeddings of a row of categorical fields: (..., F) -> (..., Σ dim)."""

    def __init__(self, fields: tuple[Field, ...], shared: dict[str, nn.Embedding] | None = None):
        super().__init__()
        shared = shared or {}
        tables: list[nn.Embedding] = []
        for f in fields:
            table = shared.get(f.name)
            if table is None:
                table = nn.Embedding(f.rows, f.dim, padding_idx=PADDING_INDEX)
                nn.init.normal_(table.weight, std=0.05)
                with torch.no_grad():
                    table.weight[PADDING_INDEX].zero_()
            tables.append(table)
        self.tables = nn.ModuleList(tables)
        self.dim = sum(f.dim for f in fields)

    def forward(self, rows: Tensor) -> Tensor:
        parts: list[Tensor] = []
        for i, table in enumerate(self.tables):
            parts.append(table(rows[..., i]))
        return torch.cat(parts, dim=-1)


class Embeddings(nn.Module):
    """User, candidate-item and event embeddings; events share the item tables."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.item = FieldEmbedding(spec.item_fields)
        item_tables = {
            f.name: table
            for f, table in zip(spec.item_fields, self.item.tables, strict=True)
            if isinstance(table, nn.Embedding)
        }
        self.event = FieldEmbedding(spec.event_fields, shared=item_tables)
        self.user = FieldEmbedding(spec.user_fields)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H·d) -> (B, H, L, d)."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, d) -> (B, L, H·d)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


class LinearSelfAttention(nn.Module):
    """Multi-head linear self-attention among the candidates (RAM, IFA Eq. 3).

    Padded candidates are masked out of the keys, so they never change a real candidate. With
    ``config.ram_degree`` the output ends with each head's log degree (see NetConfig).
    """

    def __init__(self, in_dim: int, config: NetConfig):
        super().__init__()
        self.heads = config.heads
        self.feature_map = config.feature_map
        self.query = nn.Linear(in_dim, config.heads * config.key_dim)
        self.key = nn.Linear(in_dim, config.heads * config.key_dim)
        self.value = nn.Linear(in_dim, config.heads * config.value_dim)
        self.degree = config.ram_degree
        self.out_dim = config.heads * config.value_dim + (config.heads if self.degree else 0)
        self.eps = DEFAULT_EPS

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.attend(self.query(x), self.key(x), self.value(x), mask)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
        """The attention of projected queries, keys and values (B, M, H·d each; what
        :attr:`query`, :attr:`key` and :attr:`value` make of the input) -> (B, M, out_dim)."""
        q = feature_map(split_heads(query, self.heads), self.feature_map)
        k = feature_map(split_heads(key, self.heads), self.feature_map)
        v = split_heads(value, self.heads)
        state = state_contribution(k, v, mask)
        out = merge_heads(read_state(q, state, self.eps))
        if not self.degree:
            return out
        degree = torch.log1p(attention_degree(q, state[1])).transpose(1, 2)  # (B, M, H)
        return torch.cat([out, degree], dim=-1)


class TargetAttention(nn.Module):
    """Multi-head softmax target attention from each candidate over its own key set.

    The ESU of DIN, SIM and TWIN. queries (B, M, dq); keys (B, M, K, de) — each candidate's
    own sub-sequence — or (B, 1, K, de) shared; key_mask broadcastable to (B, M, K).
    A candidate with no keys reads zeros.
    """

    def __init__(self, query_dim: int, key_dim_in: int, config: NetConfig):
        super().__init__()
        self.heads = config.heads
        self.key_dim = config.key_dim
        self.query = nn.Linear(query_dim, config.heads * config.key_dim)
        self.key = nn.Linear(key_dim_in, config.heads * config.key_dim)
        self.value = nn.Linear(key_dim_in, config.heads * config.value_dim)
        self.out_dim = config.heads * config.value_dim

    def scores(self, queries: Tensor, keys: Tensor) -> Tensor:
        """Scaled dot products (B, H, M, K) of the candidates against keys (B, M|1, K, de)."""
        b, m, _ = queries.shape
        q = self.query(queries).view(b, m, self.heads, self.key_dim)
        k = self.key(keys).view(*keys.shape[:3], self.heads, self.key_dim)
        # einsum broadcasts a shared (size-1) candidate axis without copying the keys M times.
        return torch.einsum("bmhd,bmkhd->bhmk", q, k) / (self.key_dim**0.5)

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        b, m, _ = queries.shape
        scores = self.scores(queries, keys)
        mask = key_mask.expand(b, m, -1)[:, None]  # (B, 1, M, K)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        v = self.value(keys).view(*keys.shape[:3], self.heads, -1)
        out = torch.einsum("bhmk,bmkhd->bmhd", weights, v)
        return out.reshape(b, m, -1)


class Towers(nn.Module):
    """One MLP per objective: impression, then p(action | impression) per action (ESMM)."""

    def __init__(
        self, in_dim: int, hidden: tuple[int, ...], objectives: tuple[str, ...] = OBJECTIVES
    ):
        super().__init__()
        self.objectives = objectives

        def mlp() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = in_dim
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, 1))
            return nn.Sequential(*layers)

        self.towers = nn.ModuleList(mlp() for _ in objectives)

    def forward(self, x: Tensor) -> Tensor:
        """(B, M, in_dim) -> logits (B, M, n_objectives)."""
        return torch.cat([tower(x) for tower in self.towers], dim=-1)

    def linears(self) -> list[list[nn.Linear]]:
        """Each tower's dense layers, first to last (what the fused serving forms stack)."""
        return [
            [layer for layer in tower.children() if isinstance(layer, nn.Linear)]
            for tower in self.towers
        ]


class BatchedLinear(nn.Module):
    """One layer of every tower at once: (T, R, in) -> (T, R, out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().t() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach()[None, :] for layer in layers]))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class CandidateHead(nn.Module):
    """What follows the sequence module in every network: optional RAM, then the towers.

    Input per candidate: the user embedding, the candidate embedding and the interest vector
    that the network's sequence module produced.
    """

    def __init__(
        self,
        user_dim: int,
        item_dim: int,
        interest_dim: int,
        config: NetConfig,
        objectives: tuple[str, ...] = OBJECTIVES,
    ):
        super().__init__()
        self.objectives = objectives
        self.use_ram = config.use_ram
        set_dim = 0
        if config.use_ram:
            self.ram = LinearSelfAttention(item_dim + interest_dim, config)
            set_dim = self.ram.out_dim
        # Typed as a module: serving may swap in a bf16 copy (model.serving.bf16_scorer).
        self.towers: nn.Module = Towers(
            user_dim + item_dim + interest_dim + set_dim, config.tower_hidden, objectives
        )

    def forward(self, user: Tensor, candidates: Tensor, interest: Tensor, mask: Tensor) -> Tensor:
        """user (B, du), candidates (B, M, di), interest (B, M, dr), mask (B, M) -> logits."""
        parts = [user[:, None, :].expand(-1, candidates.shape[1], -1), candidates, interest]
        if self.use_ram:
            parts.append(self.ram(torch.cat([candidates, interest], dim=-1), mask))
        return self.towers(torch.cat(parts, dim=-1))


# -- sub-sequence selection (the GSU of SIM and TWIN) and target attention over it -------------


def gather_per_candidate(x: Tensor, index: Tensor) -> Tensor:
    """Each candidate's own rows of a per-request sequence.

    x (B, N, d); index (B, M, K) int64 positions in [0, N) -> (B, M, K, d). One index_select
    over the flattened (B·N, d) rows: the sequence is never copied M times, only the selected
    rows are, and the backward is a plain index_add (advanced indexing's backward sorts).
    """
    b, n, d = x.shape
    offsets = torch.arange(b, device=x.device)[:, None, None] * n
    rows = (index + offsets).reshape(-1)
    return x.reshape(b * n, d).index_select(0, rows).view(*index.shape, d)


def masked_top_k(scores: Tensor, eligible: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Positions of the k best eligible scores along the last axis, and which of them are real.

    scores (B, M|1, N) finite floats; eligible broadcastable to scores' shape, True where an
    event may be chosen (real and passing the rule). Returns index (B, M|1, K) int64 and mask
    (B, M|1, K) bool with K = min(k, N). Ineligible events are never selected ahead of eligible
    ones; where fewer than K are eligible the rest of the slots are masked (their index points
    at an arbitrary event and must not be read without the mask).
    """
    k = min(k, scores.shape[-1])
    eligible = eligible.expand_as(scores)
    ranked = scores.masked_fill(~eligible, float("-inf"))
    top, index = torch.topk(ranked, k, dim=-1, sorted=False)
    return index, torch.isfinite(top)


def most_recent_k(eligible: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most recent eligible events (events are stored oldest first, padding last).

    eligible (B, M|1, N) bool -> index, mask (B, M|1, min(k, N)) as :func:`masked_top_k`.
    """
    position = torch.arange(eligible.shape[-1], device=eligible.device, dtype=torch.float32)
    return masked_top_k(position.expand(eligible.shape), eligible, k)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` with masked entries excluded; an all-masked slice gives zeros."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim).nan_to_num(0.0)


class SelectedTargetAttention(TargetAttention):
    """:class:`TargetAttention` of each candidate over its own selected events (a GSU's output).

    Same parameters and result as :meth:`TargetAttention.forward` on the gathered events, but
    the projections are moved to the candidate side, so only raw event rows (de wide) are
    gathered and no (B, M, K, H, d) key or value block is ever built:

    * score:  q_h·(W_k,h e + b_k,h) = (W_k,hᵀ q_h)·e + q_h·b_k,h, and the last term is the same
      for every event of a candidate, so softmax and top-K over events ignore it;
    * value:  Σ_j a_j (W_v,h e_j + b_v,h) = W_v,h (Σ_j a_j e_j) + b_v,h Σ_j a_j.

    With K ≈ 50 this is several times faster on CPU than gathering projected keys and values.
    """

    def project_queries(self, queries: Tensor) -> Tensor:
        """queries (B, M, dq) -> (B, M, H, dk), already divided by √dk."""
        b, m, _ = queries.shape
        return self.query(queries).view(b, m, self.heads, self.key_dim) / (self.key_dim**0.5)

    def queries_in_event_space(self, queries: Tensor) -> Tensor:
        """W_k,hᵀ q_h (B, M, H, de): a score against a raw event e is e·(W_kᵀ q) + q·b_k."""
        w_k = self.key.weight.view(self.heads, self.key_dim, -1)  # (H, dk, de)
        return torch.einsum("bmhd,hde->bmhe", self.project_queries(queries), w_k)

    def sequence_scores(self, queries: Tensor, events: Tensor) -> Tensor:
        """Scaled scores (B, H, M, N) of every candidate against every raw event (B, N, de).

        Equal to :meth:`TargetAttention.scores` with the events as everyone's keys; the light
        attention TWIN's GSU runs over the whole sequence with the ESU's own projections.
        """
        # Over all N events it is cheaper to project the keys (dk < de) than the queries.
        keys = self.key(events).view(*events.shape[:2], self.heads, self.key_dim)
        return torch.einsum("bmhd,bnhd->bhmn", self.project_queries(queries), keys)

    def attend_selected(
        self, queries: Tensor, events: Tensor, index: Tensor, mask: Tensor
    ) -> Tensor:
        """Softmax attention of each candidate over its selected events.

        queries (B, M, dq); events (B, N, de) raw embeddings; index and mask (B, M|1, K) from a
        GSU (a size-1 candidate axis is shared by all candidates without being copied).
        Returns (B, M, H·dv).
        """
        q_events = self.queries_in_event_space(queries)  # q·b_k cancels in the softmax
        selected = gather_per_candidate(events, index)  # (B, M|1, K, de)
        scores = torch.einsum("bmhe,bmke->bmkh", q_events, selected)
        weights = masked_softmax(scores, mask[..., None], dim=2)  # (B, M, K, H)
        pooled = torch.einsum("bmkh,bmke->bmhe", weights, selected)  # (B, M, H, de)
        w_v = self.value.weight.view(self.heads, -1, events.shape[-1])  # (H, dv, de)
        out = torch.einsum("bmhe,hve->bmhv", pooled, w_v)
        # Σ_j a_j is 1, or 0 for a candidate with nothing selected (which then reads zeros).
        out = out + self.value.bias.view(self.heads, -1) * weights.sum(dim=2)[..., None]
        return out.reshape(out.shape[0], out.shape[1], -1)


class InterestNet(nn.Module, ABC):
    """Skeleton of every baseline: embeddings -> sequence module -> interest -> CandidateHead.

    Subclasses implement :meth:`interest`; everything around it (IFA's embeddings, query input,
    optional RAM, towers) is shared so only the sequence module differs between networks.
    """

    def __init__(self, spec: FeatureSpec, config: NetConfig):
        super().__init__()
        self.config = config
        self.spec = spec
        self.embeddings = Embeddings(spec)
        self.query_dim = self.embeddings.item.dim + self.embeddings.user.dim
        self.interest_out = nn.Linear(config.interest_dim, config.interest_dim)
        self.head = CandidateHead(
            self.embeddings.user.dim,
            self.embeddings.item.dim,
            config.interest_dim,
            config,
            spec.objectives,
        )

    @abstractmethod
    def interest(self, batch: Batch, user: Tensor, candidates: Tensor, events: Tensor) -> Tensor:
        """user (B, du), candidates (B, M, di), events (B, N, de) -> (B, M, interest_dim)."""

    def forward(self, batch: Batch) -> Tensor:
        """Logits (B, M, n_objectives)."""
        u = self.embeddings.user(batch.user)
        c = self.embeddings.item(batch.candidates)
        e = self.embeddings.event(batch.events)
        interest = self.interest_out(self.interest(batch, u, c, e))
        return self.head(u, c, interest, batch.candidate_mask)


def candidate_queries(user: Tensor, candidates: Tensor) -> Tensor:
    """The attention query of every candidate, as IFA builds it: [item ; user] (B, M, di + du)."""
    return torch.cat([candidates, user[:, None, :].expand(-1, candidates.shape[1], -1)], dim=-1)


# -- the whole-history mass a sub-sequence model can have for one reduction --------------------


def log_sum_exp_mass(scores: Tensor, mask: Tensor) -> Tensor:
    """log Σ_j exp(s_j) over the real events of each row; 0 for a row with none.

    scores (..., N) finite; mask broadcastable to scores. Unlike a softmax over the events this
    keeps their number: a history with every event twice scores log 2 higher. Masked entries are
    filled with a large finite negative rather than -inf, so an empty row has a finite gradient.
    """
    mask = mask.expand_as(scores)
    filled = scores.masked_fill(~mask, -1e4)
    mass = torch.logsumexp(filled, dim=-1)
    return torch.where(mask.any(dim=-1), mass, torch.zeros_like(mass))


class MassFeature(nn.Module):
    """Interest vector + per-candidate mass features -> interest vector of the same width.

    The "+mass" baselines append what their production form has cheaply besides its sub-sequence
    (TWIN: the log-sum-exp of the GSU scores over the whole sequence; SIM-hard: the log count of
    same-category events), so a comparison with IFA's degree is on the same information.
    """

    def __init__(self, interest_dim: int, n_mass: int):
        super().__init__()
        self.mix = nn.Linear(interest_dim + n_mass, interest_dim)

    def forward(self, interest: Tensor, mass: Tensor) -> Tensor:
        """interest (B, M, d), mass (B, M, n_mass) -> (B, M, d)."""
        return self.mix(torch.cat([interest, mass], dim=-1))
