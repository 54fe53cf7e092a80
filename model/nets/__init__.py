"""The registry: every network by name, built from one feature spec and its own config."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from model.features import FeatureSpec
from model.layers import NetConfig
from model.nets.ifa import IFA, IFAConfig

NETS: dict[str, tuple[type[nn.Module], type[NetConfig]]] = {
    "ifa": (IFA, IFAConfig),
}


def build_net(name: str, spec: FeatureSpec, **overrides: Any) -> nn.Module:
    """A network by registry name; ``overrides`` replace fields of its default config."""
    if name not in NETS:
        raise KeyError(f"unknown network {name!r}; expected one of {sorted(NETS)}")
    net_class, config_class = NETS[name]
    known = {f.name for f in fields(config_class)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"{name} config has no fields {sorted(unknown)}; it has {sorted(known)}")
    # Checkpoints store tuples as JSON-style lists; configs are frozen and hashable.
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
    }
    config = config_class(**values)
    return net_class(spec, config)


def config_of(net: nn.Module) -> dict[str, Any]:
    """The config a network was built with, as plain data for a checkpoint."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} keeps no .config")
    return asdict(config)
