"""AUC by ranks against a brute-force count of positive/negative pairs, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.metrics import (
    average_ranks,
    bucketed_aucs,
    equal_mass_bins,
    expected_calibration_error,
    gauc,
    log_loss,
    objective_aucs,
    per_request_auc,
    roc_auc,
    weighted_auc,
)


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


# -- GAUC, log loss, calibration, weighted AUC: against values worked out by hand ------------


def test_per_request_auc_and_gauc_by_hand():
    # Request 0: positives 0.9, 0.4; negatives 0.5, 0.1 -> pairs (0.9>0.5, 0.9>0.1, 0.4<0.5,
    # 0.4>0.1) = 3/4. Request 1: positive 0.2 tied with a negative 0.2 and above 0.1 -> 0.75.
    # Request 2: no positive -> undefined.
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.4, 0.1, 0.2, 0.2, 0.1, 0.3, 0.7])
    group = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])

    auc = per_request_auc(labels, scores, group)
    np.testing.assert_allclose(auc[:2], [0.75, 0.75])
    assert math.isnan(auc[2])
    # Weights 2 and 1 (impressions): (2·0.75 + 1·0.75) / 3; request 2 is left out.
    assert gauc(labels, scores, group, np.array([2.0, 1.0, 5.0])) == pytest.approx(0.75)
    labels2 = np.array([1, 0, 0, 1, 1, 0])  # request 0 perfect, request 1 reversed
    scores2 = np.array([0.9, 0.1, 0.9, 0.1, 0.5, 0.6])
    group2 = np.array([0, 0, 1, 1, 2, 2])
    # AUCs 1, 0, 0 with weights 3, 1, 0 (a zero weight drops a request): 3 / 4.
    assert gauc(labels2, scores2, group2, np.array([3.0, 1.0, 0.0])) == pytest.approx(0.75)


@settings(max_examples=100, deadline=None)
@given(data=st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.integers(0, 3)), max_size=50))
def test_per_request_auc_equals_auc_of_each_request(data):

    labels = np.array([y for y, _, _ in data], dtype=bool)
    scores = np.array([s for _, s, _ in data], dtype=np.float64)
    group = np.array([g for _, _, g in data], dtype=np.int64)
    if not len(group):
        return
    auc = per_request_auc(labels, scores, group)
    for g in range(int(group.max()) + 1):
        inside = group == g
        expected = roc_auc(labels[inside], scores[inside]) if inside.any() else math.nan
        assert (math.isnan(auc[g]) and math.isnan(expected)) or auc[g] == pytest.approx(expected)


def test_log_loss_by_hand():

    expected = -(math.log(0.8) + math.log(1 - 0.4)) / 2
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(expected)
    # A certain mistake is clipped, not infinite.
    assert math.isfinite(log_loss(np.array([1]), np.array([0.0])))


def test_expected_calibration_error_by_hand():

    # Bin [0.1, 0.2): predictions 0.1, 0.1, labels 0, 1 -> |0.2 − 1| = 0.8 of sums, i.e. mean
    # gap |0.1 − 0.5| = 0.4 on 2 of 4 samples; bin [0.9, 1.0]: 0.9, 1.0 with labels 1, 1 ->
    # |0.95 − 1| = 0.05 on 2 of 4. ECE = 0.5·0.4 + 0.5·0.05 = 0.225.
    labels = np.array([0, 1, 1, 1])
    probs = np.array([0.1, 0.1, 0.9, 1.0])
    assert expected_calibration_error(labels, probs) == pytest.approx(0.225)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.5, 0.5])) == 0.0


def test_equal_mass_calibration_error_by_hand():
    # Two equal-mass bins: {0.1, 0.2} with labels 0, 1 -> |0.15 − 0.5| = 0.35; {0.3, 0.9} with
    # labels 0, 1 -> |0.6 − 0.5| = 0.1; each holds half: ECE = 0.5·0.35 + 0.5·0.1 = 0.225.
    # Equal-width bins ([0, 0.5) holds three) give 0.75·|0.2 − 1/3| + 0.25·|0.9 − 1| = 0.125.
    labels = np.array([1, 0, 0, 1])
    probs = np.array([0.2, 0.1, 0.3, 0.9])
    bins = equal_mass_bins(probs, 2)
    np.testing.assert_array_equal(bins, [0, 0, 1, 1])
    assert expected_calibration_error(labels, probs, 2, bin_of=bins) == pytest.approx(0.225)
    assert expected_calibration_error(labels, probs, 2) == pytest.approx(0.125)
    # Every bin holds n / bins predictions, whatever their spread.
    skewed = np.r_[np.full(15, 0.01), np.linspace(0.5, 1.0, 5)]
    assert np.bincount(equal_mass_bins(skewed, 10)).tolist() == [2] * 10


def test_weighted_auc_is_auc_with_repeated_samples():

    rng = np.random.default_rng(0)
    labels = rng.random(40) < 0.4
    scores = rng.integers(0, 6, 40).astype(float)
    weights = rng.integers(0, 4, 40)
    repeated = np.repeat(np.arange(40), weights)
    assert weighted_auc(labels, scores, weights) == pytest.approx(
        roc_auc(labels[repeated], scores[repeated])
    )
    assert weighted_auc(labels, scores, np.ones(40)) == pytest.approx(roc_auc(labels, scores))
