"""What an IFA variant costs where it serves, next to IFA in the same run:
``python -m model.bench --compare-nets ifa_channel,ifa_channel_decay``.

Per network (untrained, ``default_spec()``: 64 categories, so the category channel adds 64 rows
to each head's state), exported and loaded as the service loads it: the scorer with a cached
state at M candidates (fp32 and, where the machine runs it, the bf16 scorer), and the fold of
one new event into a cached state (encode it, add it: what ``POST /events`` then ``/rank`` costs
per event). Every call of every network is timed round-robin, so background load hits them all
alike; the ratios are to ``ifa`` measured in the same rounds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.artifact import ServingModel, load_artifact
from model.catalogue import Catalogue
from model.checkpoint import Checkpoint
from model.export import export_artifact, probe_inputs
from model.features import FeatureSpec
from model.layers import NetConfig
from model.nets import build_net
from model.nets.ifa import IFA

REFERENCE = "ifa"
STATE_HISTORY = 1_000
"""Events behind the cached state the scorer reads (its cost does not depend on them)."""
CALLS = ("scorer", "scorer_bf16", "fold")


def _export(name: str, spec: FeatureSpec, root: Path, program_format: str) -> Path:
    torch.manual_seed(0)
    net = build_net(name, spec, tower_hidden=list(NetConfig().tower_hidden))
    assert isinstance(net, IFA), f"{name} is not an IFA network"
    catalogue = Catalogue({"item_id": np.arange(10, dtype=np.int64)}, spec)
    return export_artifact(
        Checkpoint(name, spec, net.eval()),
        catalogue,
        root / name,
        formats=[program_format] if program_format != "eager" else [],
        precisions=("fp32", "bf16"),
    )


def _fold(model: ServingModel, events: Tensor, times: Tensor, reference: float, s: Tensor,
          z: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    new_s, new_z = model.encode(events, times, reference)
    return s + new_s, z + new_z


def net_costs(
    names: Sequence[str], spec: FeatureSpec, m: int, program_format: str = "torchscript"
) -> dict[str, Any]:
    """Median and p90 per call and network, ratios to IFA, and each network's state size."""
    from model.bench import measure_interleaved

    nets = [REFERENCE, *(n for n in names if n != REFERENCE)]
    events, event_times, reference_time, user, candidates = probe_inputs(spec, STATE_HISTORY, m)
    t_ref = float(reference_time)
    calls: dict[int, Callable[[], object]] = {}
    keys: list[tuple[str, str]] = []
    states: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ifa-net-costs-") as root, torch.inference_mode():
        for name in nets:
            directory = _export(name, spec, Path(root), program_format)
            fp32 = load_artifact(directory, program_format)
            s, z = fp32.encode(events, event_times, t_ref)
            manifest = fp32.manifest
            states[name] = {
                "key_rows": manifest.key_dim,
                "state_tensor_bytes": manifest.state_tensor_bytes,
                "channel": manifest.channel,
            }
            programs: dict[str, Callable[[], object]] = {
                "scorer": partial(fp32.score, user, candidates, s, z),
                "fold": partial(_fold, fp32, events[:1], event_times[:1], t_ref, s, z),
            }
            try:
                bf16 = load_artifact(directory, program_format, "bf16")
                programs["scorer_bf16"] = partial(bf16.score, user, candidates, s, z)
            except ValueError as error:  # a CPU without bf16 arithmetic
                states[name]["bf16"] = str(error)
            for call, fn in programs.items():
                calls[len(keys)] = fn
                keys.append((name, call))
        timings = measure_interleaved(calls)
    result: dict[str, dict[str, Any]] = {name: {"state": states[name]} for name in nets}
    for index, (name, call) in enumerate(keys):
        result[name][call] = asdict(timings[index])
    for name in nets:
        for call in CALLS:
            if call in result[name] and call in result[REFERENCE]:
                result[name][f"{call}_ratio"] = (
                    result[name][call]["median_ms"] / result[REFERENCE][call]["median_ms"]
                )
    return {"m": m, "program_format": program_format, "nets": result}


def costs_markdown(report: dict[str, Any], environment: dict[str, Any], threads: int) -> str:
    def cell(entry: dict[str, Any], call: str) -> str:
        if call not in entry:
            return "—"
        timing = entry[call]
        ratio = entry.get(f"{call}_ratio")
        return f"{timing['median_ms']:.3f} ms (p90 {timing['p90_ms']:.3f})" + (
            f", **{ratio:.2f}×**" if ratio is not None else ""
        )

    lines = [
        "# What IFA's variants cost where they serve, against IFA in the same run",
        "",
        f"`python -m model.bench --compare-nets ...` on {environment['cpu']} "
        f"({environment['logical_cpus']} logical CPUs), torch {environment['torch']}, "
        f"{threads} torch threads, {environment['date']}. Untrained networks on "
        f"`default_spec()`, {report['program_format']} programs through the service's loader; "
        f"M = {report['m']} candidates, a state of {STATE_HISTORY} events; medians of calls "
        "timed round-robin across every network (ratio = median / IFA's median).",
        "",
        "| network | rows of S per head | state (S, z) | scorer fp32 | scorer bf16 | "
        "fold one event |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in report["nets"].items():
        state = entry["state"]
        lines.append(
            f"| {name} | {state['key_rows']} | {state['state_tensor_bytes']:,} B | "
            f"{cell(entry, 'scorer')} | {cell(entry, 'scorer_bf16')} | {cell(entry, 'fold')} |"
        )
    return "\n".join(lines) + "\n"
