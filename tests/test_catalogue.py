"""The item catalogue: id -> feature rows, OOV for unknown ids, Parquet round trip."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.catalogue import Catalogue
from model.features import OOV_INDEX
from tests.factories import small_spec

SPEC = small_spec()


def make_catalogue(n: int = 50, seed: int = 0) -> Catalogue:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) * 7  # unsorted, sparse ids
    return Catalogue(
        {
            "item_id": ids,
            "category": rng.integers(0, 8, n),
            "author": rng.integers(0, 50, n),
        },
        SPEC,
    )


def test_known_ids_get_the_spec_rows_in_request_order() -> None:
    catalogue = make_catalogue()
    ids = catalogue.columns["item_id"]
    query = ids[[5, 0, 5, 17]]  # repeated ids are fine
    rows, known = catalogue.rows(query)
    expected = SPEC.item_rows(
        {name: column[[5, 0, 5, 17]] for name, column in catalogue.columns.items()}
    )
    assert known.all()
    assert rows.dtype == np.int64 and rows.shape == (4, len(SPEC.item_fields))
    np.testing.assert_array_equal(rows, expected)


def test_unknown_ids_are_all_oov_and_flagged() -> None:
    catalogue = make_catalogue()
    known_id = int(catalogue.item_ids[3])
    query = np.array([known_id, 1, 10**15, int(catalogue.item_ids.max()) + 1, known_id + 1])
    rows, known = catalogue.rows(query)
    np.testing.assert_array_equal(known, [True, False, False, False, False])
    assert (rows[1:] == OOV_INDEX).all()
    assert (rows[0] != OOV_INDEX).any()
    assert known_id in catalogue and 1 not in catalogue and "x" not in catalogue


def test_empty_query_and_empty_catalogue() -> None:
    catalogue = make_catalogue()
    rows, known = catalogue.rows(np.array([], dtype=np.int64))
    assert rows.shape == (0, len(SPEC.item_fields)) and known.shape == (0,)
    empty = Catalogue({"item_id": np.array([], dtype=np.int64)}, SPEC)
    rows, known = empty.rows(np.array([3, 4]))
    assert len(empty) == 0 and not known.any() and (rows == OOV_INDEX).all()


def test_rejects_duplicate_and_negative_ids() -> None:
    with pytest.raises(ValueError, match="duplicate item ids"):
        Catalogue({"item_id": np.array([1, 2, 1])}, SPEC)
    with pytest.raises(ValueError, match="non-negative"):
        Catalogue({"item_id": np.array([1, -2])}, SPEC)
    with pytest.raises(ValueError, match="item_id"):
        Catalogue({"category": np.array([1])}, SPEC)


def test_missing_field_column_featurises_to_oov() -> None:
    catalogue = Catalogue({"item_id": np.array([4, 9]), "category": np.array([1, 2])}, SPEC)
    rows, known = catalogue.rows(np.array([9]))
    author = SPEC.item_names.index("author")
    assert known[0] and rows[0, author] == OOV_INDEX


def test_parquet_round_trip(tmp_path: Path) -> None:
    catalogue = make_catalogue()
    path = tmp_path / "catalogue.parquet"
    catalogue.save(path)
    loaded = Catalogue.load(path, SPEC)
    query = np.concatenate([catalogue.item_ids[::3], [123456789]])
    for got, want in zip(loaded.rows(query), catalogue.rows(query), strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(loaded) == len(catalogue)


def test_loads_a_world_items_table_with_extra_columns_and_nulls(tmp_path: Path) -> None:
    table = pa.table(
        {
            "item_id": pa.array([10, 11, 12], pa.int64()),
            "category": pa.array([3, None, 5], pa.int32()),
            "author": pa.array([7, 8, 9], pa.int64()),
            "topic_weights": pa.array([[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]]),
        }
    )
    path = tmp_path / "items.parquet"
    pq.write_table(table, path)
    catalogue = Catalogue.load(path, SPEC)
    assert set(catalogue.columns) == {"item_id", "category", "author"}
    rows, known = catalogue.rows(np.array([11, 12]))
    category = SPEC.item_names.index("category")
    assert known.all()
    assert rows[0, category] == OOV_INDEX  # null attribute -> OOV
    assert rows[1, category] == SPEC.item_fields[category].index(np.array([5]))[0]


def test_lookup_is_vectorised() -> None:
    rng = np.random.default_rng(1)
    n = 100_000
    catalogue = Catalogue(
        {
            "item_id": rng.choice(10**9, n, replace=False),
            "category": rng.integers(0, 8, n),
            "author": rng.integers(0, 50, n),
        },
        SPEC,
    )
    query = np.concatenate(
        [catalogue.item_ids[rng.integers(0, n, 1500)], rng.integers(0, 10**9, 500)]
    )
    catalogue.rows(query)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        catalogue.rows(query)
        timings.append(time.perf_counter() - started)
    # A searchsorted lookup of 2000 ids takes well under a millisecond; a Python loop per id
    # over this catalogue would not. The bound is loose because the machine is shared.
    assert sorted(timings)[2] < 0.02
