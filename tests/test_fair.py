"""The fair study's verdicts: paired differences, their sign for lower-is-better metrics, and the
choice of the best fair baseline (never an IFA variant)."""

from __future__ import annotations

import numpy as np

from model.experiments.fair import METRICS, Scored, best_baseline, paired
from model.features import OBJECTIVES


def _scored(values: dict[str, float], spread: float = 0.001) -> Scored:
    """Every net's every metric and objective = its value; replicates jitter around it."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, spread, 200)  # shared by all nets: the replicates are paired
    point = {n: {m: {o: [v] for o in OBJECTIVES} for m in METRICS} for n, v in values.items()}
    reps = {
        n: {
            m: {o: v + noise + rng.normal(0, spread / 10, 200) for o in OBJECTIVES} for m in METRICS
        }
        for n, v in values.items()
    }
    return Scored({n: [0] for n in values}, point, reps, None, 100, 1000, {})


def test_verdicts_follow_the_paired_interval():
    scored = _scored({"ifa": 0.80, "twin": 0.79, "sim_hard": 0.80})
    assert paired(scored, "ifa", "twin", "gauc", "click")["verdict"] == "wins"
    assert paired(scored, "twin", "ifa", "gauc", "click")["verdict"] == "loses"
    # Equal up to noise that is paired away: a tie, whatever the shared jitter.
    assert paired(scored, "ifa", "sim_hard", "gauc", "click")["verdict"] == "ties"
    gap = paired(scored, "ifa", "twin", "auc", "click")
    assert abs(gap["gap"] - 0.01) < 1e-9 and gap["ci"][0] > 0 and gap["p"] <= 0.01


def test_lower_is_better_metrics_are_signed_so_positive_favours_the_first():
    scored = _scored({"ifa": 0.30, "twin": 0.35})  # a lower log loss is better
    result = paired(scored, "ifa", "twin", "logloss", "click")
    assert result["gap"] > 0 and result["verdict"] == "wins"


def test_best_fair_baseline_is_never_an_ifa_variant():
    scored = _scored({"ifa": 0.9, "ifa_no_degree": 0.85, "twin": 0.7, "sim_hard_mass": 0.75})
    assert best_baseline(scored) == "sim_hard_mass"
