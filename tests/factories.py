"""Small random inputs for model tests: a compact spec and requests drawn from it."""

from __future__ import annotations

import numpy as np

from model.batch import Request
from model.features import FeatureSpec, default_spec

T0 = 1.7e9


def small_spec() -> FeatureSpec:
    return default_spec(n_categories=8, n_authors=50, item_buckets=500, user_buckets=100)


def random_request(
    spec: FeatureSpec, rng: np.random.Generator, n_events: int, n_candidates: int
) -> Request:
    def items(count: int) -> np.ndarray:
        return spec.item_rows(
            {
                "item_id": rng.integers(0, 2000, count),
                "category": rng.integers(0, 8, count),
                "author": rng.integers(0, 50, count),
            }
        )

    times = T0 + np.sort(rng.uniform(0, 3e6, n_events))
    events = spec.event_rows(items(n_events), rng.integers(0, len(spec.actions), n_events), times)
    user = spec.user_rows(
        {
            "user_id": rng.integers(0, 1000, 1),
            "age_group": rng.integers(0, 8, 1),
            "gender": rng.integers(0, 3, 1),
            "region": rng.integers(0, 32, 1),
        }
    )[0]
    labels = (rng.random((n_candidates, 4)) < 0.3).astype(np.float32)
    labels[:, 1:] *= labels[:, :1]  # an action implies an impression
    return Request(user, items(n_candidates), events, times, T0 + 3.1e6, labels)
