"""AUC by ranks against a brute-force count of positive/negative pairs, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.metrics import average_ranks, bucketed_aucs, objective_aucs, roc_auc


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score+ > score-) + ½ P(tie) over every positive/negative pair."""
    pos = scores[labels.astype(bool)]
    neg = scores[~labels.astype(bool)]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=60),
)
def test_auc_equals_pairwise_count_with_ties(data):
    labels = np.array([y for y, _ in data])
    scores = np.array([s for _, s in data], dtype=np.float64) / 3.0  # few values: many ties
    if labels.all() or not labels.any():
        assert math.isnan(roc_auc(labels, scores))
    else:
        assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_on_continuous_scores():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.2
    scores = rng.normal(size=500) + labels
    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_extremes():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.full(4, 0.5)) == 0.5


def test_auc_rejects_nan_scores_and_mismatched_shapes():
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        roc_auc(np.array([0, 1, 1]), np.array([0.1, 0.2]))


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(
        average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4.0, 1.0, 4.0, 2.0, 4.0]
    )


def test_objective_and_bucketed_aucs_match_subsets():
    rng = np.random.default_rng(1)
    n = 400
    labels = (rng.random((n, 4)) < 0.3).astype(np.int8)
    scores = rng.random((n, 4)) + 0.5 * labels
    values = rng.integers(0, 100, n)
    per_objective = objective_aucs(labels, scores)
    assert list(per_objective) == ["impression", "click", "long_view", "like"]
    assert per_objective["click"] == pytest.approx(pairwise_auc(labels[:, 1], scores[:, 1]))
    buckets = bucketed_aucs(labels, scores, values, [0, 30, 70, math.inf])
    assert [b["count"] for b in buckets] == [
        (values < 30).sum(),
        ((values >= 30) & (values < 70)).sum(),
        (values >= 70).sum(),
    ]
    inside = (values >= 30) & (values < 70)
    assert buckets[1]["like"] == pytest.approx(pairwise_auc(labels[inside, 3], scores[inside, 3]))
