"""The item catalogue: candidate ids -> item feature rows, as the service needs them per request.

A ranking request names its candidates by id only; the scorer needs each candidate's item
feature rows (``FeatureSpec.item_rows``: hashed id, category, author, ...). The catalogue keeps
the raw item columns (so it can be saved and re-featurised under another spec) and, beside them,
the featurised rows sorted by id, so that a lookup of M ids is one ``np.searchsorted`` over the
catalogue plus one gather: O(M log K) with no Python loop per id.

An id the catalogue does not hold gets every field set to :data:`model.features.OOV_INDEX`
(DESIGN §5: unknown candidates are scored with out-of-vocabulary embeddings, and counted by the
caller through the returned ``known`` mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.features import OOV_INDEX, FeatureSpec

ID_COLUMN = "item_id"
MISSING_VALUE = -1
"""Raw value stored for a null attribute; negative raw values featurise to OOV."""
DENSE_SPAN_PER_ITEM = 4
"""A catalogue whose ids span at most this many integers per item (plus 1,024) is located
through a table indexed by id (8 bytes per integer of the span): a gather per candidate instead
of a binary search over the catalogue, which at M = 1,000 candidates and 100,000 items cost ten
times as much, its probes missing the CPU caches."""


class Catalogue:
    """Items known to the service and their feature rows under one :class:`FeatureSpec`.

    ``columns`` holds raw int64 values: ``item_id`` (unique, non-negative) plus any of the spec's
    item field names; a field without a column featurises to OOV for every item, as in
    :meth:`FeatureSpec.item_rows`.
    """

    def __init__(self, columns: Mapping[str, np.ndarray], spec: FeatureSpec):
        if ID_COLUMN not in columns:
            raise ValueError(f"catalogue columns need {ID_COLUMN!r}; got {sorted(columns)}")
        ids = np.asarray(columns[ID_COLUMN], dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"{ID_COLUMN} must be one-dimensional, got shape {ids.shape}")
        if ids.size and ids.min() < 0:
            raise ValueError("item ids must be non-negative 64-bit integers")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        duplicated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if duplicated.size:
            raise ValueError(f"duplicate item ids in catalogue, e.g. {duplicated[:5].tolist()}")
        # Keep only what the spec reads: other columns (a world's latent topics) are not features.
        kept = [ID_COLUMN, *(n for n in spec.item_names if n in columns and n != ID_COLUMN)]
        self.spec = spec
        self.columns: dict[str, np.ndarray] = {
            name: np.asarray(columns[name], dtype=np.int64)[order] for name in kept
        }
        self._ids = sorted_ids  # (K,) ascending
        self._rows = spec.item_rows(self.columns)  # (K, F_item), aligned with _ids
        self._oov_row = np.full(len(spec.item_fields), OOV_INDEX, dtype=np.int64)
        self._position_by_offset = _dense_positions(sorted_ids)
        """(span,) each id's position at ``id - smallest id``, -1 between them; None when the ids
        are too sparse for a table (:data:`DENSE_SPAN_PER_ITEM`)."""

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def item_ids(self) -> np.ndarray:
        """(K,) int64 ids, ascending (read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feature rows of the given ids, in the given order.

        item_ids (M,) integers -> (rows (M, F_item) int64, known (M,) bool). Unknown ids get an
        all-OOV row and ``known`` False.
        """
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if self._ids.size == 0:
            return np.tile(self._oov_row, (ids.size, 1)), np.zeros(ids.size, dtype=bool)
        position, known = self.positions(ids)
        rows = np.where(known[:, None], self._rows[position], self._oov_row[None, :])
        return rows, known

    def positions(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(M,) positions of int64 ids in :attr:`item_ids` and (M,) whether each is there (the
        position of an absent id is 0)."""
        ids = item_ids
        if self._ids.size == 0:
            return np.zeros(ids.size, dtype=np.int64), np.zeros(ids.size, dtype=bool)
        table = self._position_by_offset
        if table is not None:
            smallest = self._ids[0]
            inside = (ids >= smallest) & (ids < smallest + table.size)
            found = table[np.where(inside, ids - smallest, 0)]
            known = inside & (found >= 0)
            return np.where(known, found, 0), known
        # searchsorted returns K for ids above the largest; clip so the comparison can index.
        position = np.minimum(np.searchsorted(self._ids, ids), self._ids.size - 1)
        return position, self._ids[position] == ids

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, int | np.integer):
            return False
        return bool(self.rows(np.array([item_id]))[1][0])

    # -- Parquet -----------------------------------------------------------------------------

    def to_table(self) -> pa.Table:
        return pa.table(
            {name: pa.array(values, pa.int64()) for name, values in self.columns.items()}
        )

    def save(self, path: Path) -> None:
        """Write the raw columns as Parquet (ids ascending)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.to_table(), path)

    @classmethod
    def from_table(cls, table: pa.Table, spec: FeatureSpec) -> Catalogue:
        """From an Arrow table with ``item_id`` and item field columns (others are ignored).

        Nulls in an attribute column become :data:`MISSING_VALUE` (OOV); a null id is an error.
        """
        columns: dict[str, np.ndarray] = {}
        for name in (ID_COLUMN, *spec.item_names):
            if name not in table.column_names or name in columns:
                continue
            column = table.column(name)
            if name == ID_COLUMN and column.null_count:
                raise ValueError(f"{column.null_count} null item ids in catalogue")
            filled = column.fill_null(MISSING_VALUE) if column.null_count else column
            columns[name] = np.asarray(filled.to_numpy(), dtype=np.int64)
        return cls(columns, spec)

    @classmethod
    def load(cls, path: Path, spec: FeatureSpec) -> Catalogue:
        """Read a Parquet file written by :meth:`save` or any table with the same columns
        (e.g. a synthetic world's ``items.parquet``); only the needed columns are read."""
        wanted = {ID_COLUMN, *spec.item_names}
        available = pq.read_schema(path).names
        return cls.from_table(
            pq.read_table(path, columns=[c for c in available if c in wanted]), spec
        )


def _dense_positions(ids: np.ndarray) -> np.ndarray | None:
    """The table of ``Catalogue._position_by_offset`` for ascending ``ids``."""
    if not ids.size:
        return None
    span = int(ids[-1]) - int(ids[0]) + 1
    if span > DENSE_SPAN_PER_ITEM * ids.size + 1024:
        return None
    table = np.full(span, -1, dtype=np.int64)
    table[ids - ids[0]] = np.arange(ids.size)
    return table
