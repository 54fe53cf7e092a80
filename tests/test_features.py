"""The feature spec: padding, OOV buckets, stable hashing, time features, serialisation."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from model.features import (
    ACTIONS,
    OBJECTIVES,
    OOV_INDEX,
    RESERVED_ROWS,
    FeatureSpec,
    Field,
    check_actions,
    default_spec,
    mix64,
    objectives_of,
)
from tests.factories import small_spec


def test_vocab_values_outside_the_vocabulary_go_to_oov():
    field = Field("category", "vocab", 5, 4)
    rows = field.index(np.array([0, 4, 5, -1, 1 << 40]))
    assert rows.tolist() == [RESERVED_ROWS, RESERVED_ROWS + 4, OOV_INDEX, OOV_INDEX, OOV_INDEX]


def test_hashed_ids_are_stable_in_range_and_spread():
    field = Field("item_id", "hashed", 1000, 8)
    ids = np.arange(0, 100_000, dtype=np.int64)
    rows = field.index(ids)
    assert rows.min() >= RESERVED_ROWS and rows.max() < field.rows
    assert len(np.unique(rows)) > 990
    np.testing.assert_array_equal(rows, field.index(ids))  # deterministic
    assert field.index(np.array([np.iinfo(np.int64).max]))[0] >= RESERVED_ROWS
    assert mix64(np.array([0]))[0] != mix64(np.array([1]))[0]


def test_missing_columns_map_to_oov_and_lengths_must_agree():
    spec = small_spec()
    rows = spec.item_rows({"item_id": np.array([3, 4])})
    assert rows.shape == (2, len(spec.item_fields))
    assert (rows[:, 1:] == OOV_INDEX).all()
    with pytest.raises(ValueError, match="differ in length"):
        spec.item_rows({"item_id": np.array([1, 2]), "category": np.array([1])})


def test_event_rows_carry_absolute_time_features_only():
    spec = small_spec()
    monday_0930_utc = 1732527000.0  # 2024-11-25 09:30 UTC
    rows = spec.event_rows(
        spec.item_rows({"item_id": np.array([1])}), np.array([1]), np.array([monday_0930_utc])
    )
    hour_row, weekday_row = rows[0, -2:]
    assert hour_row == RESERVED_ROWS + 9
    assert weekday_row == RESERVED_ROWS + 0
    assert rows.shape == (1, len(spec.event_fields))


def test_unknown_action_names_the_vocabulary():
    with pytest.raises(KeyError, match="click"):
        small_spec().action_index("share")


def test_spec_round_trips_through_json_dict():
    spec = small_spec()
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_known_ids_get_their_own_rows_and_others_hash_past_them():
    field = Field("item_id", "hashed", 10, 8, known_ids=(5, 7, 1 << 40))
    rows = field.index(np.array([5, 7, 1 << 40, 6, -3]))
    assert rows[:3].tolist() == [RESERVED_ROWS, RESERVED_ROWS + 1, RESERVED_ROWS + 2]
    assert RESERVED_ROWS + 3 <= rows[3] < field.rows == RESERVED_ROWS + 3 + 10
    assert rows[4] == OOV_INDEX
    with pytest.raises(ValueError, match="increasing"):
        Field("item_id", "hashed", 10, 8, known_ids=(7, 5))


def test_spec_with_known_ids_round_trips_through_json():
    spec = default_spec(n_categories=4, item_ids=[3, 1, 2], user_ids=np.arange(5))
    again = FeatureSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec
    assert again.item_fields[0].known_ids == (1, 2, 3)


def test_a_vocabulary_needs_impression_and_its_objectives_put_it_first() -> None:
    assert objectives_of(("click", "impression", "cart")) == ("impression", "click", "cart")
    assert check_actions(["cart", "impression"]) == ("cart", "impression")
    for bad in (["click", "cart"], ["impression"], ["impression", "click", "click"]):
        with pytest.raises(ValueError, match="actions"):
            check_actions(bad)


def test_a_spec_saved_without_actions_reads_the_default_vocabulary() -> None:
    saved = default_spec(n_categories=4, n_authors=8).to_dict()
    del saved["actions"]
    spec = FeatureSpec.from_dict(saved)
    assert spec.actions == ACTIONS and spec.objectives == OBJECTIVES
    shop = replace(spec, actions=("purchase", "impression", "click"))
    assert FeatureSpec.from_dict(shop.to_dict()).objectives == ("impression", "purchase", "click")
