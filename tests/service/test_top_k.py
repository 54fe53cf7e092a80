"""The top k of /rank's answer: the same indices, in the same order, as a stable full sort."""

from __future__ import annotations

import numpy as np
import pytest

from service.ranker import top_k


@pytest.mark.parametrize("seed", range(4))
def test_top_k_is_the_stable_argsort_with_ties_nans_and_signed_zeros(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(500):
        m, k = int(rng.integers(1, 60)), int(rng.integers(1, 70))
        scores = (rng.integers(0, 5, m) / 4).astype(np.float32)  # many ties
        scores[rng.random(m) < 0.2] = np.nan
        scores[rng.random(m) < 0.2] = -0.0
        expected = np.argsort(-scores, kind="stable")[:k]
        assert top_k(scores, k).tolist() == expected.tolist(), (scores, k)
