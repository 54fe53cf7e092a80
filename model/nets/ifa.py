"""IFA: full-sequence linear cross attention (FSM) + relation-aware module (RAM) + ESMM towers.

The network is the composition of two programs that are exported and served separately:

* :class:`SequenceEncoder` — events -> additive user state (S, z). A pure function of the event
  set and the weights, so the service caches it and folds new events in.
* :class:`ExactMatchChannel` (optional) — appends a scaled one-hot of item attributes to the
  kernel on both sides (DESIGN §2), so the read also counts exact same-category events.
* :class:`CandidateScorer` — user, candidate set, state -> per-objective logits. Costs
  O(M·d²) whatever the history length.

Training runs ``scorer(encoder(events))``, so serving and training are the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.batch import Batch
from model.features import OBJECTIVES, RESERVED_ROWS, FeatureSpec
from model.layers import (
    CandidateHead,
    Embeddings,
    FieldEmbedding,
    NetConfig,
    merge_heads,
    split_heads,
)
from model.linear_attention import (
    DEFAULT_EPS,
    attention_degree,
    attribute_onehot,
    decay_weights,
    exact_match_read,
    feature_map,
    read_state,
    state_contribution,
    with_exact_match,
)

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class IFAConfig(NetConfig):
    use_fsm: bool = True
    """Always True for IFA; the ablation without FSM is a separate network (TWIN + RAM)."""
    fsm_feature_map: str = "relu"
    """Kernel φ of FSM's cross attention. relu can be exactly zero, so φ(q)ᵀφ(k) vanishes
    between unrelated items and the degree φ(q)ᵀz counts only the events that matter to q;
    elu+1 and softplus are > 0 everywhere, so with them every event adds to every degree."""
    time_decay: bool = False
    """Per-head exponential decay of old events, learned; keeps the fold property."""
    degree_feature: bool = True
    """Also feed log(1 + φ(q)ᵀz) per head to the towers (see CandidateScorer). False leaves
    only the normalised read of the paper's Eq. 6 (the ``ifa_no_degree`` ablation)."""
    channel_fields: tuple[str, ...] = ()
    """Item fields of the exact-match channel (empty: no channel, the plain kernel)."""
    channel_slots: int = 64
    """Most one-hot slots per channel field: a field with more values (author) shares slots by
    a fixed bucketing of its rows; one with fewer (category) matches exactly."""
    channel_features: bool = True
    """Also feed the towers, per channel field and head, log(1 + exact count of the user's
    events with the candidate's value) and those events' mean value (shrunk by one pseudo-event,
    see :func:`model.linear_attention.exact_match_read`): SIM-hard+mass's information, read from
    the state without a top-K cut."""
    eps: float = DEFAULT_EPS


@dataclass(frozen=True)
class IFAChannelConfig(IFAConfig):
    """IFA with an exact-match channel on the category."""

    channel_fields: tuple[str, ...] = ("category",)


@dataclass(frozen=True)
class IFADecayConfig(IFAConfig):
    """IFA with its learned per-head time decay on."""

    time_decay: bool = True


@dataclass(frozen=True)
class IFAChannelDecayConfig(IFAChannelConfig):
    """IFA with the category channel and time decay."""

    time_decay: bool = True


@dataclass(frozen=True)
class IFANoDegreeConfig(IFAConfig):
    """IFA reading only the normalised attention (the paper's Eq. 6), without the degree."""

    degree_feature: bool = False


@dataclass(frozen=True)
class IFANoRAMConfig(IFAConfig):
    """IFA without its relation-aware module: candidates scored one by one."""

    use_ram: bool = False


class ExactMatchChannel(nn.Module):
    """The channel's fields and per-head scales: β on the keys (starts at 1, so the tail of z
    is the exact per-value count) and γ on the queries (starts at 0: the net starts as the
    plain kernel and learns how much exact match to use). One instance is shared by the encoder
    and the scorer, as the item embeddings are, so each exported program carries it.

    Rows (..., F) may be item rows or event rows: events start with the item fields.
    """

    def __init__(self, spec: FeatureSpec, config: IFAConfig):
        super().__init__()
        names = spec.item_names
        unknown = [name for name in config.channel_fields if name not in names]
        if unknown or not config.channel_fields:
            raise ValueError(
                f"exact-match channel fields {list(config.channel_fields)} must be a non-empty "
                f"subset of the item fields {list(names)}"
            )
        columns = [names.index(name) for name in config.channel_fields]
        self.sizes: list[int] = [
            min(spec.item_fields[c].rows - RESERVED_ROWS, config.channel_slots) for c in columns
        ]
        self.width = sum(self.sizes)
        self.first_row = RESERVED_ROWS
        self.columns: Tensor
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.log_key_scale = nn.Parameter(torch.zeros(config.heads))
        # γ = max(raw, 0) keeps every degree ≥ 0. Its gradient passes straight through even
        # where raw ≤ 0: a head whose first steps push γ below 0 would otherwise never use the
        # channel again (half the heads did, on the first batch, in a random start).
        self.query_scale_raw = nn.Parameter(torch.zeros(config.heads))

    def key_scale(self) -> Tensor:
        """(H,) β_h > 0."""
        return torch.exp(self.log_key_scale)

    def query_scale(self) -> Tensor:
        """(H,) γ_h ≥ 0."""
        raw = self.query_scale_raw
        return raw + (raw.clamp(min=0.0) - raw).detach()

    def onehot(self, rows: Tensor) -> Tensor:
        """(..., F) rows -> (..., width) slots of the channel fields."""
        return attribute_onehot(rows.index_select(-1, self.columns), self.sizes, self.first_row)


class SequenceEncoder(nn.Module):
    """Behaviour events -> additive state contribution (S (B, H, dk', dv), z (B, H, dk')), with
    dk' = dk + the channel's width."""

    def __init__(
        self,
        event_embedding: FieldEmbedding,
        config: IFAConfig,
        channel: ExactMatchChannel | None = None,
    ):
        super().__init__()
        self.heads = config.heads
        self.feature_map = config.fsm_feature_map
        self.time_decay = config.time_decay
        self.event_embedding = event_embedding
        self.key = nn.Linear(event_embedding.dim, config.heads * config.key_dim)
        self.value = nn.Linear(event_embedding.dim, config.heads * config.value_dim)
        # Softplus keeps rates positive; the initial value gives a half-life of about 30 days.
        self.decay_logit = nn.Parameter(torch.full((config.heads,), -3.8))
        self.seconds_per_day = SECONDS_PER_DAY
        self.channel = channel
        self.state_key_dim = config.key_dim + (channel.width if channel is not None else 0)
        """Rows of S per head: the key dim plus the channel's slots."""

    def decay_rates(self) -> Tensor:
        """(H,) per-second decay rates; zeros when time decay is off."""
        if not self.time_decay:
            return torch.zeros_like(self.decay_logit)
        return F.softplus(self.decay_logit) / self.seconds_per_day

    def keys_values(self, events: Tensor) -> tuple[Tensor, Tensor]:
        """Each event's φ'(k) (B, H, N, dk') and v (B, H, N, dv): its state contribution before
        the decay weight (also what /explain weighs events with)."""
        e = self.event_embedding(events)
        keys = feature_map(split_heads(self.key(e), self.heads), self.feature_map)
        if self.channel is not None:
            keys = with_exact_match(keys, self.channel.onehot(events), self.channel.key_scale())
        return keys, split_heads(self.value(e), self.heads)

    def forward(
        self, events: Tensor, event_mask: Tensor, event_times: Tensor, reference_time: Tensor
    ) -> tuple[Tensor, Tensor]:
        """events (B, N, F_event), event_mask (B, N), event_times (B, N) and reference_time (B,)
        in unix seconds (float64). With decay, contributions are discounted to reference_time."""
        keys, values = self.keys_values(events)
        weights: Tensor | None = None
        if self.time_decay:
            weights = decay_weights(event_times, reference_time, self.decay_rates())
        return state_contribution(keys, values, event_mask, weights)


class CandidateScorer(nn.Module):
    """User, candidates and a cached state -> logits (B, M, n_objectives).

    The normalised read D⁻¹φ(Q)S is a weighted *mean* of values, blind to how much of the history
    is relevant. The degree φ(q)ᵀz that normalises it is that amount — the attention mass of the
    whole sequence on the candidate — so its log is kept as a feature per head. It comes free with
    the read, and no top-K sub-sequence can count past K (a softmax over K events reports shares,
    never counts). With a kernel that can be zero (relu) the degree counts only the events the
    head finds related to the candidate; with elu+1 it mostly counts the whole history.
    """

    def __init__(
        self,
        embeddings: Embeddings,
        config: IFAConfig,
        channel: ExactMatchChannel | None = None,
        objectives: tuple[str, ...] = OBJECTIVES,
    ):
        super().__init__()
        self.heads = config.heads
        self.key_dim = config.key_dim
        self.feature_map = config.fsm_feature_map
        self.eps = config.eps
        self.degree_feature = config.degree_feature
        self.user_embedding = embeddings.user
        self.item_embedding = embeddings.item
        query_in = embeddings.item.dim + embeddings.user.dim
        self.query = nn.Linear(query_in, config.heads * config.key_dim)
        degree_dim = config.heads if config.degree_feature else 0
        plain_dim = config.interest_dim + degree_dim
        self.channel = channel
        self.channel_features = channel is not None and config.channel_features
        channel_dim = 0
        if channel is not None and config.channel_features:
            channel_dim = len(channel.sizes) * config.heads * (1 + config.value_dim)
        self.fsm_out = nn.Linear(plain_dim + channel_dim, config.interest_dim)
        if channel_dim:
            # The channel's features start unused, as γ starts at 0: the net starts as IFA.
            with torch.no_grad():
                self.fsm_out.weight[:, plain_dim:].zero_()
        self.head = CandidateHead(
            embeddings.user.dim, embeddings.item.dim, config.interest_dim, config, objectives
        )

    def query_features(
        self, user_embedding: Tensor, candidate_embeddings: Tensor, candidate_onehot: Tensor
    ) -> Tensor:
        """φ'(q) (B, H, M, dk') of embedded users (B, du) and candidates (B, M, di), with the
        candidates' channel slots (B, M, C) (C = 0 without a channel)."""
        expanded = user_embedding[:, None, :].expand(-1, candidate_embeddings.shape[1], -1)
        q_in = torch.cat([candidate_embeddings, expanded], dim=-1)
        return self.query_map(self.query(q_in), candidate_onehot)

    def query_map(self, projected: Tensor, candidate_onehot: Tensor) -> Tensor:
        """φ'(q) (B, H, M, dk') of the query projection (B, M, H·dk) and the candidates' channel
        slots (B, M, C)."""
        phi = feature_map(split_heads(projected, self.heads), self.feature_map)
        if self.channel is not None:
            phi = with_exact_match(phi, candidate_onehot, self.channel.query_scale())
        return phi

    def candidate_onehot(self, candidates: Tensor) -> Tensor:
        """(B, M, C) channel slots of candidate rows (B, M, F_item); C = 0 without a channel."""
        if self.channel is not None:
            return self.channel.onehot(candidates)
        return candidates.new_zeros(candidates.shape[0], candidates.shape[1], 0).float()

    def channel_reads(self, onehot: Tensor, s: Tensor, z: Tensor) -> list[Tensor]:
        """Per channel field: log(1 + exact count) (B, M, H) and the (shrunk) mean value of the
        user's events with the candidate's value (B, M, H·dv), read from the state's tail."""
        parts: list[Tensor] = []
        if self.channel is not None:
            key_scale = self.channel.key_scale()
            offset = 0  # of the field's slots in the onehot; the state's tail starts at dk
            for size in self.channel.sizes:
                rows = self.key_dim + offset
                tail = (s[:, :, rows : rows + size], z[:, :, rows : rows + size])
                field_onehot = onehot[:, :, offset : offset + size]
                counts, means = exact_match_read(field_onehot, tail, key_scale)
                parts.append(torch.log1p(counts).transpose(1, 2))
                parts.append(merge_heads(means))
                offset += size
        return parts

    def forward(
        self, user: Tensor, candidates: Tensor, candidate_mask: Tensor, s: Tensor, z: Tensor
    ) -> Tensor:
        """user (B, F_user), candidates (B, M, F_item), candidate_mask (B, M), state (S, z)."""
        u = self.user_embedding(user)  # (B, du)
        c = self.item_embedding(candidates)  # (B, M, di)
        onehot = self.candidate_onehot(candidates)  # (B, M, C)
        queries = self.query_features(u, c, onehot)
        return self.head(u, c, self.interest(queries, onehot, s, z), candidate_mask)

    def interest(self, queries: Tensor, onehot: Tensor, s: Tensor, z: Tensor) -> Tensor:
        """The interest vector (B, M, interest_dim) of queries φ'(q) (B, H, M, dk') read from the
        state: the normalised read, the degree and the channel's reads, through ``fsm_out``."""
        parts = [merge_heads(read_state(queries, (s, z), self.eps))]
        if self.degree_feature:
            parts.append(torch.log1p(attention_degree(queries, z)).transpose(1, 2))  # (B, M, H)
        if self.channel_features:
            parts.extend(self.channel_reads(onehot, s, z))
        return self.fsm_out(torch.cat(parts, dim=-1))


class IFA(nn.Module):
    """The training-time composition scorer(encoder(events))."""

    def __init__(self, spec: FeatureSpec, config: IFAConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(spec)
        channel = ExactMatchChannel(spec, config) if config.channel_fields else None
        self.encoder = SequenceEncoder(self.embeddings.event, config, channel)
        self.scorer = CandidateScorer(self.embeddings, config, channel, spec.objectives)

    def forward(self, batch: Batch) -> Tensor:
        s, z = self.encoder(batch.events, batch.event_mask, batch.event_times, batch.request_time)
        return self.scorer(batch.user, batch.candidates, batch.candidate_mask, s, z)
