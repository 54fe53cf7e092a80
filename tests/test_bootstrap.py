"""Bootstrap over requests: a replicate equals the metric on the resampled requests."""

from __future__ import annotations

import numpy as np
import pytest

from model.bootstrap import (
    RequestStats,
    auc_replicates,
    interval,
    replicate_counts,
    two_sided_p,
)
from model.metrics import equal_mass_bins, expected_calibration_error, gauc, log_loss, roc_auc


def _stream(seed: int = 0, n_requests: int = 30, per: int = 8):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n_requests), per)
    probs = rng.random(len(group))
    labels = (rng.random(len(group)) < probs).astype(np.int8)
    weight = np.bincount(group, weights=labels, minlength=n_requests)
    return labels, probs, group, weight


def _resampled(counts_row, labels, probs, group, weight):
    """The stream with each request repeated as often as the replicate draws it (new ids)."""
    take: list[np.ndarray] = []
    new_group: list[np.ndarray] = []
    new_weight: list[float] = []
    for r, k in enumerate(counts_row.astype(int)):
        for _ in range(k):
            take.append(np.flatnonzero(group == r))
            new_group.append(np.full(int((group == r).sum()), len(new_weight)))
            new_weight.append(weight[r])
    rows = np.concatenate(take)
    return labels[rows], probs[rows], np.concatenate(new_group), np.array(new_weight), rows


def test_replicate_counts_draw_every_request_total_once_per_slot():
    counts = replicate_counts(50, 7, seed=1)
    assert counts.shape == (7, 50)
    assert np.all(counts.sum(axis=1) == 50)


def test_a_replicate_is_the_metric_on_the_resampled_requests():
    labels, probs, group, weight = _stream()
    counts = replicate_counts(30, 3, seed=2)
    stats = RequestStats.of(labels, probs, group, weight)
    got = stats.metrics(counts)
    aucs = auc_replicates(labels, probs, group, counts)
    bins = equal_mass_bins(probs)  # fixed on the whole stream, not redrawn per replicate
    for b in range(3):
        y, p, g, w, rows = _resampled(counts[b], labels, probs, group, weight)
        assert got["gauc"][b] == pytest.approx(gauc(y, p, g, w))
        assert got["logloss"][b] == pytest.approx(log_loss(y, p))
        assert got["ece"][b] == pytest.approx(expected_calibration_error(y, p, bin_of=bins[rows]))
        assert aucs[b] == pytest.approx(roc_auc(y, p))
    plain = stats.metrics(np.ones((1, 30)))
    assert plain["gauc"][0] == pytest.approx(gauc(labels, probs, group, weight))


def test_gauc_by_impressions_and_by_clicks_by_hand():
    # Request 0: one click of three, ranked first: AUC 1. Request 1: clicks at 0.2 and 0.8
    # against 0.5 and 0.9: one pair of four ordered, AUC 0.25. By impressions (3 and 4):
    # (3·1 + 4·0.25) / 7 = 4/7; by clicks (1 and 2): (1·1 + 2·0.25) / 3 = 0.5.
    labels = np.array([1, 0, 0, 1, 1, 0, 0])
    scores = np.array([0.9, 0.5, 0.1, 0.2, 0.8, 0.5, 0.9])
    group = np.array([0, 0, 0, 1, 1, 1, 1])
    stats = RequestStats.of(labels, scores, group, np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    got = stats.metrics(np.ones((1, 2)))
    assert got["gauc"][0] == pytest.approx(4 / 7)
    assert got["gauc_click"][0] == pytest.approx(0.5)
    # A request without a click weighs nothing by clicks.
    none = RequestStats.of(labels, scores, group, np.array([3.0, 4.0]), np.array([0.0, 2.0]))
    assert none.metrics(np.ones((1, 2)))["gauc_click"][0] == pytest.approx(0.25)


def test_interval_and_p_value():
    values = np.linspace(0.0, 1.0, 1001)
    low, high = interval(values)
    assert low == pytest.approx(0.025) and high == pytest.approx(0.975)
    assert two_sided_p(np.full(200, 0.1)) == pytest.approx(1 / 200)  # floor: 1 / replicates
    assert two_sided_p(np.r_[np.full(50, -1.0), np.full(150, 1.0)]) == pytest.approx(0.5)
