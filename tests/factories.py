"""Small random inputs for model tests: a compact spec and requests drawn from it."""

from __future__ import annotations

import numpy as np
import torch

from model.batch import Request
from model.features import FeatureSpec, default_spec
from model.nets.ifa import IFA

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


def live_channel(net: IFA, seed: int = 1) -> IFA:
    """``net`` with γ > 0 and β ≠ 1 on every head and its channel features in use, so that
    tests exercise every term the channel adds (a fresh net starts with γ = 0)."""
    generator = torch.Generator().manual_seed(seed)
    channel = net.encoder.channel
    assert channel is not None
    heads = channel.query_scale_raw.shape[0]
    with torch.no_grad():
        channel.query_scale_raw.copy_(0.5 + torch.rand(heads, generator=generator))
        channel.log_key_scale.copy_(torch.randn(heads, generator=generator) * 0.3)
        weight = net.scorer.fsm_out.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return net
