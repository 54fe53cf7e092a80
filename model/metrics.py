"""Ranking metrics in numpy: AUC by the Mann–Whitney rank statistic, per objective and per bucket.

AUC = P(score of a random positive > score of a random negative) + ½ P(tie). With average ranks
r_i over all n samples, U = Σ_{positives} r_i − n_pos(n_pos + 1)/2 counts exactly those pairs,
so one sort gives the AUC of millions of candidates in O(n log n) with ties handled.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from model.features import OBJECTIVES


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores`` (n,), tied values sharing the mean of the ranks they span."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    # Start of each run of equal values in sorted order; a run [s, e) holds ranks s+1 .. e.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    ranks = np.empty(len(ordered), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` (n,) against ``scores`` (n,).

    Ties count one half. NaN when only one class is present (the AUC is undefined there, and a
    silent 0.5 would pass for a real number in a results table). NaN scores are an error.
    """
    positive = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if positive.shape != scores.shape:
        raise ValueError(f"labels {positive.shape} and scores {scores.shape} differ in shape")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = average_ranks(scores)[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def objective_aucs(
    labels: np.ndarray, scores: np.ndarray, objectives: Sequence[str] = OBJECTIVES
) -> dict[str, float]:
    """AUC per objective column: labels and scores (n, n_objectives) -> {objective: AUC}."""
    return {name: roc_auc(labels[:, i], scores[:, i]) for i, name in enumerate(objectives)}


def bucketed_aucs(
    labels: np.ndarray,
    scores: np.ndarray,
    values: np.ndarray,
    edges: Sequence[float],
    objectives: Sequence[str] = OBJECTIVES,
) -> list[dict[str, float]]:
    """Per-objective AUC within buckets ``edges[i] <= value < edges[i + 1]``.

    labels, scores (n, n_objectives); values (n,) e.g. each candidate's history length. Each
    bucket's dict holds ``lo``, ``hi``, ``count`` (samples) and one AUC per objective.
    """
    out: list[dict[str, float]] = []
    for lo, hi in pairwise(edges):
        inside = (values >= lo) & (values < hi)
        row: dict[str, float] = {"lo": float(lo), "hi": float(hi), "count": float(inside.sum())}
        row.update(objective_aucs(labels[inside], scores[inside], objectives))
        out.append(row)
    return out


# -- per-request ranking and probability quality -------------------------------------------


def request_index(request_rows: np.ndarray) -> np.ndarray:
    """Dense request index 0..R-1 of each sample, from any per-sample request identifiers."""
    return np.unique(np.asarray(request_rows), return_inverse=True)[1].astype(np.int64)


def per_request_auc(labels: np.ndarray, scores: np.ndarray, group: np.ndarray) -> np.ndarray:
    """AUC of each request (R,) by the rank statistic within the request, ties counting ½.

    ``group`` (n,) dense request index (see :func:`request_index`). NaN for a request whose
    labels are all one class. One lexsort for all requests: no Python loop over them.
    """
    positive = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    group = np.asarray(group, dtype=np.int64).ravel()
    n_groups = int(group.max()) + 1 if len(group) else 0
    order = np.lexsort((scores, group))
    g, s = group[order], scores[order]
    # Runs of equal (request, score) share the mean of their within-request ranks.
    new_run = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], len(s)]
    group_start = np.searchsorted(g, np.arange(n_groups))
    mean_position = (run_start + run_end - 1) / 2.0  # 0-based mean position of each run
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(mean_position, run_end - run_start) - group_start[g] + 1.0
    n_pos = np.bincount(group, weights=positive, minlength=n_groups)
    n_all = np.bincount(group, minlength=n_groups)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(group, weights=np.where(positive, ranks, 0.0), minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def gauc(labels: np.ndarray, scores: np.ndarray, group: np.ndarray, weights: np.ndarray) -> float:
    """Group AUC: Σ_r w_r AUC_r / Σ_r w_r over the requests whose AUC is defined.

    ``weights`` (R,) per request; the studies use each request's number of impressions, so a
    request the user saw more of counts more (the per-user/per-request GAUC of the DIN paper).
    """
    auc = per_request_auc(labels, scores, group)
    ok = ~np.isnan(auc) & (np.asarray(weights) > 0)
    total = float(np.asarray(weights)[ok].sum())
    return float((auc[ok] * np.asarray(weights)[ok]).sum() / total) if total else float("nan")


PROBABILITY_FLOOR = 1e-7
"""Probabilities are clipped to [floor, 1 − floor] for log loss: one confident mistake in
float32 must not make the mean infinite."""


def log_losses(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Binary cross entropy of each sample (n,), natural log."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), PROBABILITY_FLOOR, 1.0)
    p = np.minimum(p, 1.0 - PROBABILITY_FLOOR)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross entropy (natural log)."""
    return float(log_losses(labels, probabilities).mean())


CALIBRATION_BINS = 10


def calibration_bins(probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Equal-width bin of each probability in [0, 1] (1.0 falls in the last bin)."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    return np.minimum((p * bins).astype(np.int64), bins - 1)


def equal_mass_bins(probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Equal-mass bin of each probability: the k-th smallest of n goes to bin ⌊k·bins / n⌋, so
    every bin holds n/bins predictions (±1; ties split by position). Equal-width bins put almost
    every joint probability of a rare action in the first bin, where ECE measures only the
    overall rate."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    out = np.empty(len(p), dtype=np.int64)
    out[np.argsort(p, kind="mergesort")] = np.arange(len(p)) * bins // max(len(p), 1)
    return out


def expected_calibration_error(
    labels: np.ndarray,
    probabilities: np.ndarray,
    bins: int = CALIBRATION_BINS,
    bin_of: np.ndarray | None = None,
) -> float:
    """ECE: Σ_b (n_b / n) · |mean prediction_b − positive rate_b| over ``bins`` bins.

    ``bin_of`` (n,) each sample's bin (e.g. :func:`equal_mass_bins`); equal-width when None.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    b = calibration_bins(p, bins) if bin_of is None else np.asarray(bin_of).ravel()
    count = np.bincount(b, minlength=bins)
    gap = np.abs(
        np.bincount(b, weights=p, minlength=bins) - np.bincount(b, weights=y, minlength=bins)
    )
    return float(gap.sum() / max(count.sum(), 1))


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """AUC with sample weights (a bootstrap replicate's multiplicities): the weighted share of
    positive/negative pairs ordered correctly, ties ½. Equals :func:`roc_auc` for unit weights."""
    positive = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    order = np.argsort(scores, kind="mergesort")
    s, pos, w = scores[order], positive[order], w[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w_pos = np.add.reduceat(np.where(pos, w, 0.0), starts)
    w_neg = np.add.reduceat(np.where(pos, 0.0, w), starts)
    below = np.cumsum(w_neg) - w_neg  # negative weight strictly below each tie group
    total_pos, total_neg = w_pos.sum(), w_neg.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    return float((w_pos * (below + 0.5 * w_neg)).sum() / (total_pos * total_neg))
