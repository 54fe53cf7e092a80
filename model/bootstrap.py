"""Bootstrap over requests: confidence intervals and paired differences of ranking metrics.

The unit of resampling is the request (its candidates are not independent of each other). One
matrix of request multiplicities per world is shared by every model and seed evaluated on that
world, so a replicate's difference between two models is *paired*: both are scored on the same
resampled requests. Everything but the pooled AUC is a ratio of per-request sums, so a
replicate is one matrix product with the multiplicities; the pooled AUC is recomputed with the
multiplicities as sample weights (sorted once per run).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.metrics import (
    CALIBRATION_BINS,
    equal_mass_bins,
    log_losses,
    per_request_auc,
)

N_REPLICATES = 1000


def replicate_counts(n_requests: int, n_replicates: int, seed: int = 0) -> np.ndarray:
    """(B, R) multiplicities: each replicate draws R requests with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_requests, size=(n_replicates, n_requests))
    counts = np.zeros((n_replicates, n_requests), dtype=np.float64)
    np.add.at(counts, (np.arange(n_replicates)[:, None], draws), 1.0)
    return counts


@dataclass(frozen=True)
class RequestStats:
    """Per-request sufficient statistics of one run on one objective (R requests)."""

    auc: np.ndarray  # (R,) NaN where undefined
    weight: np.ndarray  # (R,) GAUC weight (impressions of the request)
    click_weight: np.ndarray  # (R,) the other GAUC weight (clicks of the request)
    loss_sum: np.ndarray  # (R,) Σ log loss over the request's candidates
    count: np.ndarray  # (R,) candidates
    bin_p: np.ndarray  # (R, bins) Σ prediction per calibration bin
    bin_y: np.ndarray  # (R, bins) Σ label per calibration bin
    bin_n: np.ndarray  # (R, bins) candidates per calibration bin

    @classmethod
    def of(
        cls,
        labels: np.ndarray,
        probabilities: np.ndarray,
        group: np.ndarray,
        weight: np.ndarray,
        click_weight: np.ndarray | None = None,
        bins: int = CALIBRATION_BINS,
    ) -> RequestStats:
        """labels, probabilities, group (n,); group a dense request index; weight and
        click_weight (R,) (click_weight defaults to weight).

        Calibration bins are equal-mass over these predictions and stay fixed across
        replicates (a replicate's bins hold about, not exactly, equal mass)."""
        r = len(weight)
        y = np.asarray(labels, dtype=np.float64)
        p = np.asarray(probabilities, dtype=np.float64)
        cell = group * bins + equal_mass_bins(p, bins)
        size = r * bins
        return cls(
            auc=per_request_auc(y, p, group),
            weight=np.asarray(weight, dtype=np.float64),
            click_weight=np.asarray(weight if click_weight is None else click_weight, np.float64),
            loss_sum=np.bincount(group, weights=log_losses(y, p), minlength=r),
            count=np.bincount(group, minlength=r).astype(np.float64),
            bin_p=np.bincount(cell, weights=p, minlength=size).reshape(r, bins),
            bin_y=np.bincount(cell, weights=y, minlength=size).reshape(r, bins),
            bin_n=np.bincount(cell, minlength=size).reshape(r, bins).astype(np.float64),
        )

    def metrics(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """GAUC (both weightings), log loss and ECE under request multiplicities ``counts``
        (B, R) -> (B,) each: ``gauc`` weighs requests by ``weight``, ``gauc_click`` by
        ``click_weight``.

        A row of ones gives the plain (unresampled) value.
        """
        defined = ~np.isnan(self.auc)
        auc = np.nan_to_num(self.auc)
        w = np.where(defined, self.weight, 0.0)
        w_click = np.where(defined, self.click_weight, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            gauc = (counts @ (auc * w)) / (counts @ w)
            gauc_click = (counts @ (auc * w_click)) / (counts @ w_click)
        loss = (counts @ self.loss_sum) / (counts @ self.count)
        gap = np.abs(counts @ self.bin_p - counts @ self.bin_y).sum(axis=1)
        ece = gap / (counts @ self.bin_n).sum(axis=1)
        return {"gauc": gauc, "gauc_click": gauc_click, "logloss": loss, "ece": ece}


def auc_replicates(
    labels: np.ndarray, scores: np.ndarray, group: np.ndarray, counts: np.ndarray, chunk: int = 25
) -> np.ndarray:
    """Pooled AUC of every replicate (B,): each candidate weighted by its request's multiplicity.

    Sorted once; per replicate only weighted sums over tie groups (see metrics.weighted_auc).
    """
    positive = np.asarray(labels).astype(bool).ravel()
    order = np.argsort(np.asarray(scores, dtype=np.float64).ravel(), kind="mergesort")
    s = np.asarray(scores, dtype=np.float64).ravel()[order]
    pos, g = positive[order], np.asarray(group)[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    out = np.empty(len(counts))
    for lo in range(0, len(counts), chunk):
        w = counts[lo : lo + chunk][:, g]  # (b, n)
        w_pos = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
        w_neg = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
        below = np.cumsum(w_neg, axis=1) - w_neg
        num = (w_pos * (below + 0.5 * w_neg)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + chunk] = num / (w_pos.sum(axis=1) * w_neg.sum(axis=1))
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.nanpercentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def two_sided_p(differences: np.ndarray) -> float:
    """Bootstrap p-value of a paired difference being 0: twice the smaller tail share, with the
    replicate count as the floor (p is never reported as 0 from a finite bootstrap). NaN when
    no replicate is defined (a window too small to hold both classes)."""
    d = np.asarray(differences)
    d = d[~np.isnan(d)]
    if not len(d):
        return float("nan")
    tail = min((d <= 0).mean(), (d >= 0).mean())
    return float(min(1.0, max(2.0 * tail, 1.0 / len(d))))
