"""Self-describing checkpoints: enough to rebuild the network without hard-coded sizes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.features import FeatureSpec
from model.nets import build_net, config_of


@dataclass
class Checkpoint:
    net_name: str
    spec: FeatureSpec
    net: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)
    """Training facts worth keeping beside the weights: world, seed, metrics, fusion weights."""


def plain_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as plain JSON types: numpy scalars would make ``weights_only`` loading fail."""
    converted: dict[str, Any] = json.loads(json.dumps(metadata, default=_to_builtin))
    return converted


def _to_builtin(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint metadata value {value!r} is not JSON-serialisable")


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "net": checkpoint.net_name,
            "config": config_of(checkpoint.net),
            "spec": checkpoint.spec.to_dict(),
            "state_dict": checkpoint.net.state_dict(),
            "metadata": plain_metadata(checkpoint.metadata),
        },
        path,
    )


def load_checkpoint(path: Path) -> Checkpoint:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    spec = FeatureSpec.from_dict(raw["spec"])
    net = build_net(raw["net"], spec, **raw["config"])
    net.load_state_dict(raw["state_dict"])
    net.eval()
    return Checkpoint(raw["net"], spec, net, dict(raw.get("metadata", {})))
