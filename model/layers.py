"""Blocks shared by every network: embeddings, attention modules, towers.

The networks differ only in how they turn the behaviour sequence into a per-candidate interest
vector; embeddings, the relation-aware module and the ESMM towers are these same classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.features import OBJECTIVES, PADDING_INDEX, FeatureSpec, Field
from model.linear_attention import DEFAULT_EPS, feature_map, linear_attention


@dataclass(frozen=True)
class NetConfig:
    """Sizes every network shares; each network's own config extends it."""

    heads: int = 4
    key_dim: int = 16
    value_dim: int = 16
    tower_hidden: tuple[int, ...] = (128, 64)
    feature_map: str = "elu"
    use_ram: bool = True

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

    Padded candidates are masked out of the keys, so they never change a real candidate.
    """

    def __init__(self, in_dim: int, config: NetConfig):
        super().__init__()
        self.heads = config.heads
        self.feature_map = config.feature_map
        self.query = nn.Linear(in_dim, config.heads * config.key_dim)
        self.key = nn.Linear(in_dim, config.heads * config.key_dim)
        self.value = nn.Linear(in_dim, config.heads * config.value_dim)
        self.out_dim = config.heads * config.value_dim
        self.eps = DEFAULT_EPS

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q = feature_map(split_heads(self.query(x), self.heads), self.feature_map)
        k = feature_map(split_heads(self.key(x), self.heads), self.feature_map)
        v = split_heads(self.value(x), self.heads)
        return merge_heads(linear_attention(q, k, v, mask, eps=self.eps))


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
        return torch.einsum("bmhd,bmkhd->bhmk", q, k.expand(b, m, -1, -1, -1)) / (
            self.key_dim**0.5
        )

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        b, m, _ = queries.shape
        scores = self.scores(queries, keys)
        mask = key_mask.expand(b, m, -1)[:, None]  # (B, 1, M, K)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        v = self.value(keys).view(*keys.shape[:3], self.heads, -1)
        out = torch.einsum("bhmk,bmkhd->bmhd", weights, v.expand(b, m, -1, -1, -1))
        return out.reshape(b, m, -1)


class Towers(nn.Module):
    """One MLP per objective: impression, then p(action | impression) per action (ESMM)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], objectives: tuple[str, ...] = OBJECTIVES):
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


class CandidateHead(nn.Module):
    """What follows the sequence module in every network: optional RAM, then the towers.

    Input per candidate: the user embedding, the candidate embedding and the interest vector
    that the network's sequence module produced.
    """

    def __init__(self, user_dim: int, item_dim: int, interest_dim: int, config: NetConfig):
        super().__init__()
        self.use_ram = config.use_ram
        set_dim = 0
        if config.use_ram:
            self.ram = LinearSelfAttention(item_dim + interest_dim, config)
            set_dim = self.ram.out_dim
        self.towers = Towers(user_dim + item_dim + interest_dim + set_dim, config.tower_hidden)

    def forward(self, user: Tensor, candidates: Tensor, interest: Tensor, mask: Tensor) -> Tensor:
        """user (B, du), candidates (B, M, di), interest (B, M, dr), mask (B, M) -> logits."""
        parts = [user[:, None, :].expand(-1, candidates.shape[1], -1), candidates, interest]
        if self.use_ram:
            parts.append(self.ram(torch.cat([candidates, interest], dim=-1), mask))
        return self.towers(torch.cat(parts, dim=-1))
