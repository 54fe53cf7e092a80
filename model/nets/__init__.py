"""The registry: every network by name, built from one feature spec and its own config."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from model.features import FeatureSpec
from model.layers import NetConfig
from model.nets.avgpool import AvgPool, AvgPoolConfig
from model.nets.din import DIN, DINConfig, DINSoftmax, DINSoftmaxConfig
from model.nets.ifa import (
    IFA,
    IFAChannelConfig,
    IFAChannelDecayConfig,
    IFAConfig,
    IFADecayConfig,
    IFANoDegreeConfig,
    IFANoRAMConfig,
)
from model.nets.sim_hard import SIMHard, SIMHardConfig, SIMHardMassConfig
from model.nets.sim_soft import SIMSoft, SIMSoftConfig
from model.nets.twin import (
    TWIN,
    IFANoFSMConfig,
    TWINConfig,
    TWINK100Config,
    TWINK100MassConfig,
    TWINK200Config,
    TWINK200MassConfig,
    TWINMassConfig,
)

NETS: dict[str, tuple[type[nn.Module], type[NetConfig]]] = {
    "ifa": (IFA, IFAConfig),
    "avgpool": (AvgPool, AvgPoolConfig),
    "din": (DIN, DINConfig),
    "din_softmax": (DINSoftmax, DINSoftmaxConfig),
    "sim_hard": (SIMHard, SIMHardConfig),
    "sim_soft": (SIMSoft, SIMSoftConfig),
    "twin": (TWIN, TWINConfig),
    "twin_k100": (TWIN, TWINK100Config),
    "twin_k200": (TWIN, TWINK200Config),
    # "+mass": the whole-history count their production form has for one reduction.
    "sim_hard_mass": (SIMHard, SIMHardMassConfig),
    "twin_mass": (TWIN, TWINMassConfig),
    "twin_k100_mass": (TWIN, TWINK100MassConfig),
    "twin_k200_mass": (TWIN, TWINK200MassConfig),
    # IFA's ablations (IFA §5.3): FSM replaced by TWIN's two-step attention, then RAM removed
    # too, which is TWIN itself under its own name.
    "ifa_no_fsm": (TWIN, IFANoFSMConfig),
    "ifa_no_fsm_ram": (TWIN, TWINConfig),
    # Not in the paper: IFA without the degree feature, i.e. the normalised read of Eq. 6 alone.
    "ifa_no_degree": (IFA, IFANoDegreeConfig),
    "ifa_no_ram": (IFA, IFANoRAMConfig),
    # IFA with an exact-match channel on the category in its kernel (DESIGN §2), with its
    # learned per-head time decay, and both.
    "ifa_channel": (IFA, IFAChannelConfig),
    "ifa_decay": (IFA, IFADecayConfig),
    "ifa_channel_decay": (IFA, IFAChannelDecayConfig),
}


def net_config(name: str, **overrides: Any) -> NetConfig:
    """The config of network ``name``: its defaults with ``overrides`` replacing fields."""
    if name not in NETS:
        raise KeyError(f"unknown network {name!r}; expected one of {sorted(NETS)}")
    config_class = NETS[name][1]
    known = {f.name for f in fields(config_class)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"{name} config has no fields {sorted(unknown)}; it has {sorted(known)}")
    # Checkpoints store tuples as JSON-style lists; configs are frozen and hashable.
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
    }
    return config_class(**values)


def build_net(name: str, spec: FeatureSpec, **overrides: Any) -> nn.Module:
    """A network by registry name; ``overrides`` replace fields of its default config."""
    config = net_config(name, **overrides)
    return NETS[name][0](spec, config)


def config_of(net: nn.Module) -> dict[str, Any]:
    """The config a network was built with, as plain data for a checkpoint."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} keeps no .config")
    return asdict(config)
