"""The serving scorer with every first layer split by what its input depends on.

Three layers of the scorer read the candidate's item embedding c or the user's embedding u
beside per-pair inputs: the FSM query ``W_q [c ; u]``, RAM's projections ``W_r [c ; interest]``
and each objective tower's first layer ``W_t [u ; c ; interest ; ram]``. A linear layer is a sum
over its input blocks, ``W x = W_c c + W_u u + W_p p``, so:

* the item blocks of all of them are one projection of c, ``(M, d_item) -> (M, P)``: computed
  once per request from the candidates' embedding rows, or gathered from per-field tables of
  projected embedding rows (``item_tables``: ``E_f W_fᵀ``, exact for any row of the field, so a
  live-catalogue item or an unknown id needs no refresh);
* the user blocks and every bias are one vector per request, ``(P,)``, not M rows;
* only the blocks of the pair inputs (the FSM read and RAM's output) stay per candidate.

The towers' first layers are one matrix and their later layers one batched matmul per depth,
as :class:`model.serving.FusedTowers` has them. This is the same arithmetic as
:class:`model.serving.ServingScorer` in another order: equal within float32 rounding
(tests/model/test_split_scorer.py). With ``precision="bf16"`` the per-pair tower blocks and the
later tower layers run in bfloat16, as the bf16 scorer's towers do; the item and user blocks
stay float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.layers import BatchedLinear, LinearSelfAttention, Towers
from model.nets.ifa import CandidateScorer

ITEM_TABLE_BUDGET_BYTES = 256 * 2**20
"""Most bytes of projected rows a scorer carries for one item field (a float32 row of P values
per embedding row); a field with more rows has its item blocks computed per request from its
embedding rows instead (the same result). The demo's catalogue of 2,500 items takes 7.7 MB."""


class SplitScorer(nn.Module):
    """``(user (F_user,), candidates (M, F_item), S, z) -> (probabilities (M, 1 + A), score
    (M,))``, as :class:`model.serving.ServingScorer`, from its trained modules."""

    def __init__(
        self,
        base: CandidateScorer,
        fusion: Tensor,
        precision: str = "fp32",
        table_budget_bytes: int = ITEM_TABLE_BUDGET_BYTES,
    ):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}; expected 'fp32' or 'bf16'")
        head = base.head
        towers = head.towers
        assert isinstance(towers, Towers), "a split scorer is built from the fp32 network"
        self.base = base
        """Kept for its embeddings, channel and FSM read (their methods run as trained)."""
        self.fusion: Tensor
        self.register_buffer("fusion", fusion.detach().clone())
        self.bf16 = precision == "bf16"
        self.use_ram = head.use_ram
        du, di = base.user_embedding.dim, base.item_embedding.dim
        dr = base.fsm_out.out_features  # the interest vector's width
        stacks = towers.linears()
        self.tower_count = len(stacks)
        self.tower_hidden = stacks[0][0].out_features
        tower_first = torch.cat([stack[0].weight for stack in stacks])  # (T·h, du+di+dr+set)

        # Blocks of every first layer, in the order [FSM query ; RAM q, k, v ; towers].
        item_blocks: list[Tensor] = [base.query.weight[:, :di]]
        user_blocks: list[Tensor] = [base.query.weight[:, di:]]
        biases: list[Tensor] = [base.query.bias]
        self.query_width = base.query.out_features
        self.ram_key_width = 0
        ram_pair: list[Tensor] = []
        if head.use_ram:
            ram = head.ram
            assert isinstance(ram, LinearSelfAttention)
            self.ram_key_width = ram.query.out_features
            for linear in (ram.query, ram.key, ram.value):
                item_blocks.append(linear.weight[:, :di])
                user_blocks.append(linear.weight.new_zeros(linear.out_features, du))
                biases.append(linear.bias)
                ram_pair.append(linear.weight[:, di:])
        self.ram_width = sum(block.shape[0] for block in ram_pair)
        item_blocks.append(tower_first[:, du : du + di])
        user_blocks.append(tower_first[:, :du])
        biases.append(torch.cat([stack[0].bias for stack in stacks]))

        with torch.no_grad():
            item_weight = torch.cat(item_blocks)  # (P, di)
            self.user_weight = nn.Parameter(torch.cat(user_blocks).t().contiguous())  # (du, P)
            self.bias = nn.Parameter(torch.cat(biases))  # (P,)
            self.ram_pair = nn.Parameter(
                torch.cat(ram_pair).t().contiguous() if ram_pair else torch.zeros(dr, 0)
            )  # (dr, 2·H·dk + H·dv)
            low = torch.bfloat16 if self.bf16 else torch.float32
            self.tower_pair = nn.Parameter(tower_first[:, du + di :].t().contiguous().to(low))
            self.later = nn.ModuleList(
                BatchedLinear([stack[depth] for stack in stacks]).to(low)
                for depth in range(1, len(stacks[0]))
            )
            self._split_item_blocks(base, item_weight, table_budget_bytes)

    def _split_item_blocks(self, base: CandidateScorer, weight: Tensor, budget: int) -> None:
        """Per item field: its projected embedding rows (``E_f W_fᵀ``, gathered per request)
        where they fit ``budget``, else its columns of the item blocks (computed per request)."""
        tables: list[Tensor] = []
        offsets: list[int] = []
        table_fields: list[int] = []
        computed_columns: list[int] = []
        start = column = 0
        for field, table in enumerate(base.item_embedding.tables):
            assert isinstance(table, nn.Embedding)
            width = table.embedding_dim
            if table.num_embeddings * weight.shape[0] * 4 <= budget:
                tables.append(table.weight @ weight[:, column : column + width].t())
                offsets.append(start)
                table_fields.append(field)
                start += table.num_embeddings
            else:
                computed_columns.extend(range(column, column + width))
            column += width
        self.item_tables = nn.Parameter(
            torch.cat(tables) if tables else weight.new_zeros(0, weight.shape[0])
        )  # (Σ rows of the tabled fields, P)
        self.table_fields: Tensor
        self.register_buffer("table_fields", torch.tensor(table_fields, dtype=torch.long))
        self.table_offsets: Tensor
        self.register_buffer("table_offsets", torch.tensor(offsets, dtype=torch.long))
        self.computed_columns: Tensor
        self.register_buffer("computed_columns", torch.tensor(computed_columns, dtype=torch.long))
        self.computed_weight = nn.Parameter(weight[:, computed_columns].t().contiguous())
        self.has_tables = bool(tables)
        self.has_computed = bool(computed_columns)

    def item_side(self, candidates: Tensor) -> Tensor:
        """(M, P): the item blocks of every first layer for candidate rows (M, F_item)."""
        side = torch.zeros(candidates.shape[0], self.bias.shape[0], device=candidates.device)
        if self.has_tables:
            rows = candidates.index_select(1, self.table_fields) + self.table_offsets[None, :]
            side = F.embedding_bag(rows, self.item_tables, mode="sum")
        if self.has_computed:
            c = self.base.item_embedding(candidates[None])[0].index_select(1, self.computed_columns)
            side = torch.addmm(side, c, self.computed_weight)
        return side

    def forward(
        self, user: Tensor, candidates: Tensor, s: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor]:
        m = candidates.shape[0]
        u = self.base.user_embedding(user[None])  # (1, du)
        per_request = torch.addmm(self.bias[None, :], u, self.user_weight)  # (1, P)
        first = self.item_side(candidates) + per_request  # (M, P)

        # FSM: the query's pre-activation is item and user blocks only.
        qw = self.query_width
        onehot = self.base.candidate_onehot(candidates[None])  # (1, M, C)
        phi = self.base.query_map(first[None, :, :qw], onehot)
        interest = self.base.interest(phi, onehot, s[None], z[None])[0]  # (M, dr)

        pair = [interest]
        if self.use_ram:
            kw = self.ram_key_width
            projected = torch.addmm(first[:, qw : qw + self.ram_width], interest, self.ram_pair)
            real = torch.ones(1, m, dtype=torch.bool, device=candidates.device)
            out = self.base.head.ram.attend(
                projected[None, :, :kw], projected[None, :, kw : 2 * kw],
                projected[None, :, 2 * kw :], real,
            )  # fmt: skip
            pair.append(out[0])

        # Towers: the item and user blocks are in `first`; the pair blocks are per candidate.
        pair_input = torch.cat(pair, dim=-1)
        tower_pre = first[:, qw + self.ram_width :]
        if self.bf16:
            pair_part = (pair_input.to(torch.bfloat16) @ self.tower_pair).to(torch.float32)
            h = torch.relu(tower_pre + pair_part).to(torch.bfloat16)
        else:
            h = torch.relu(torch.addmm(tower_pre, pair_input, self.tower_pair))
        h = h.reshape(m, self.tower_count, self.tower_hidden).transpose(0, 1)  # (T, M, h)
        last = len(self.later) - 1
        for depth, layer in enumerate(self.later):
            h = layer(h)
            if depth < last:
                h = torch.relu(h)
        logits = h[:, :, 0].transpose(0, 1).to(torch.float32)  # (M, T)
        probabilities = torch.sigmoid(logits)
        score = probabilities[:, 0] * (probabilities[:, 1:] @ self.fusion)
        return probabilities, score
