"""A padded batch of ranking requests: the input every network takes.

Requests differ in history length N and candidate count M; both are padded to the batch maximum
and masked. Padded events add nothing to any state, padded candidates touch neither RAM nor the
loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """Tensors of B requests (int64 feature rows from :class:`model.features.FeatureSpec`)."""

    user: Tensor  # (B, F_user) int64
    candidates: Tensor  # (B, M, F_item) int64
    candidate_mask: Tensor  # (B, M) bool
    events: Tensor  # (B, N, F_event) int64, oldest first
    event_mask: Tensor  # (B, N) bool
    event_times: Tensor  # (B, N) float64, unix seconds
    request_time: Tensor  # (B,) float64, unix seconds
    labels: Tensor | None = None  # (B, M, n_objectives) float32: impression, then actions

    @property
    def size(self) -> int:
        return int(self.user.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if value is not None else None
        return Batch(**moved)


@dataclass(frozen=True)
class Request:
    """One request before padding (numpy arrays as produced by the data pipeline)."""

    user: np.ndarray  # (F_user,)
    candidates: np.ndarray  # (M, F_item)
    events: np.ndarray  # (N, F_event)
    event_times: np.ndarray  # (N,)
    request_time: float
    labels: np.ndarray | None = None  # (M, n_objectives)


def collate(requests: list[Request], n_event_fields: int, n_item_fields: int) -> Batch:
    """Pad requests into one :class:`Batch` (N and M padded to the batch maximum, at least 1)."""
    b = len(requests)
    max_m = max(1, *(len(r.candidates) for r in requests))
    max_n = max(1, *(len(r.events) for r in requests))
    candidates = np.zeros((b, max_m, n_item_fields), dtype=np.int64)
    candidate_mask = np.zeros((b, max_m), dtype=bool)
    events = np.zeros((b, max_n, n_event_fields), dtype=np.int64)
    event_mask = np.zeros((b, max_n), dtype=bool)
    event_times = np.zeros((b, max_n), dtype=np.float64)
    has_labels = all(r.labels is not None for r in requests)
    n_objectives = (
        requests[0].labels.shape[1] if has_labels and requests[0].labels is not None else 0
    )
    labels = np.zeros((b, max_m, n_objectives), dtype=np.float32)
    for i, r in enumerate(requests):
        m, n = len(r.candidates), len(r.events)
        candidates[i, :m] = r.candidates
        candidate_mask[i, :m] = True
        events[i, :n] = r.events
        event_mask[i, :n] = True
        event_times[i, :n] = r.event_times
        if has_labels and r.labels is not None:
            labels[i, :m] = r.labels
    return Batch(
        user=torch.from_numpy(np.stack([r.user for r in requests]).astype(np.int64)),
        candidates=torch.from_numpy(candidates),
        candidate_mask=torch.from_numpy(candidate_mask),
        events=torch.from_numpy(events),
        event_mask=torch.from_numpy(event_mask),
        event_times=torch.from_numpy(event_times),
        request_time=torch.tensor([r.request_time for r in requests], dtype=torch.float64),
        labels=torch.from_numpy(labels) if has_labels else None,
    )
