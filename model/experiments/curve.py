"""The learning curve: the fair study's networks on one world of the study family at 17× its
requests, trained once in a single streaming pass.

Score-then-train makes every prediction out of sample, so one run gives the whole curve: the
point at c× is the predictions made for the unit of requests that follows the first c units of
the stream (a unit = the study's request count), scored like the fair study (AUC, GAUC by
impressions and by clicks, log loss and ECE per objective, 95% bootstrap intervals over the
window's requests, paired verdicts against the best fair baseline of that window). A window's
requests are predicted by a model that has trained on c units and at most one batch less than
c + 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.bootstrap import N_REPLICATES, interval
from model.experiments.common import Options, Report, ensure_world, training_seconds
from model.experiments.fair import (
    FAIR,
    LABELS,
    METRIC_DEFINITIONS,
    TESTED_IFA,
    WORLD_SEED,
    Scored,
    _gap,
    _seed_note,
    _world_data,
    _world_section,
    best_baseline,
    best_ifa,
    comparisons,
    paired,
    score_world,
)
from model.world import Preset, resolve_preset

CURVE_NETS: tuple[str, ...] = (
    "avgpool", "din_softmax", "sim_hard", "sim_hard_mass", "twin_k100", "twin_k100_mass",
    "ifa_no_degree", "ifa", "ifa_no_ram", "ifa_decay", "ifa_channel", "ifa_channel_decay",
)  # fmt: skip
CATEGORY_RULE: tuple[str, ...] = ("sim_hard", "sim_hard_mass")
"""The baselines that read the history by the candidate's category: a rule, not learned."""
CURVE_BASE = "study_mixed"
CUTS: tuple[int, ...] = (1, 2, 4, 8, 16)
"""Units of requests seen before each scored window."""
DETAILED_CUTS: tuple[int, ...] = (1, 4, 16)
"""The cuts whose full metric tables the report shows (the others are in the summary)."""
CURVE_UNITS = CUTS[-1] + 1
"""Units in the world: the last window follows the 16th."""
STUDY_SEEDS: tuple[int, ...] = (0, 1)
CURVE = replace(FAIR, warmup=0.0)
"""Every prediction is kept: the windows pick the points of the curve."""


def ran_line(seconds: dict[str, float], seeds: str, workers: int) -> str:
    """The results header's account of what ran and for how long."""
    return (
        f"**Ran:** {seconds['runs']:.0f} training runs (seeds per network: {seeds}), "
        f"{seconds['seconds'] / 3600:.2f} h of training wall time in all, {workers} at a time "
        f"(cached runs are reused; a run is retrained when its settings, its network's config or "
        f"the fingerprint of its world's files differ)."
    )


def scaled(base: str | Preset, units: int, unit_users: int | None, name: str) -> Preset:
    """``base`` with ``units`` × ``unit_users`` users (requests grow in proportion; the catalogue
    stays, so every item is seen ``units`` times as often)."""
    preset = resolve_preset(base)
    users = (unit_users or preset.n_users) * units
    return replace(preset, name=f"{name}_{users}u", n_users=users)


def world_requests(world: Path) -> int:
    return int(json.loads((world / "world.json").read_text())["sizes"]["n_requests"])


def window(n_requests: int, units: int, seen: int) -> tuple[int, int]:
    """Stream positions [lo, hi) of the unit of requests after ``seen`` of ``units`` units."""
    unit = n_requests / units
    return round(seen * unit), round((seen + 1) * unit)


# -- headlines --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One scored window of the curve."""

    seen: int
    """Units seen before the window."""
    requests_seen: int
    scored: Scored
    best: str
    tests: dict[str, Any]


def learned_against_rule(scored: Scored) -> dict[str, Any] | None:
    """The best learned network (not the category rule) against the best category rule."""
    rule = [n for n in CATEGORY_RULE if n in scored.seeds]
    learned = [n for n in scored.seeds if n not in CATEGORY_RULE]
    if not rule or not learned:
        return None

    def click(n: str) -> float:
        return float(np.mean(scored.point[n]["gauc"]["click"]))

    best_rule, best_learned = max(rule, key=click), max(learned, key=click)
    return {
        "learned": best_learned,
        "rule": best_rule,
        "test": paired(scored, best_learned, best_rule, "gauc", "click"),
    }


def headlines(points: Sequence[Point]) -> list[str]:
    """What the numbers say, one line each: best IFA against the best fair baseline per cut,
    where the learned models overtake the category rule, and IFA without RAM."""
    lines = []
    for p in points:
        variant = best_ifa(p.scored)
        if variant is None or variant not in p.tests:
            continue
        t = p.tests[variant]["gauc"]["click"]
        lines.append(
            f"After {p.seen}× ({p.requests_seen:,} requests seen) the best IFA variant, "
            f"{LABELS[variant]}, **{t['verdict']}** against the best fair baseline, "
            f"{LABELS[p.best]} (click GAUC {_gap(t)})."
        )
    overtaken = None
    for p in points:
        versus = learned_against_rule(p.scored)
        if versus is not None and versus["test"]["verdict"] != "loses":
            overtaken = (p, versus)
            break
    last = points[-1]
    versus_last = learned_against_rule(last.scored)
    if overtaken is not None:
        p, versus = overtaken
        word = "beats" if versus["test"]["verdict"] == "wins" else "ties"
        when = "already at" if p is points[0] else "at"
        lines.append(
            f"The learned models catch the category rule {when} {p.seen}× "
            f"({p.requests_seen:,} requests seen): {LABELS[versus['learned']]} {word} "
            f"{LABELS[versus['rule']]} (click GAUC {_gap(versus['test'])})."
        )
    elif versus_last is not None:
        lines.append(
            f"The learned models do not catch the category rule by {last.seen}×: the best, "
            f"{LABELS[versus_last['learned']]}, still loses to {LABELS[versus_last['rule']]} "
            f"(click GAUC {_gap(versus_last['test'])})."
        )
    no_ram = last.tests.get("ifa_no_ram")
    if no_ram is not None:
        t = no_ram["gauc"]["click"]
        lines.append(
            f"IFA+degree without RAM (the full-sequence read alone, like the baselines without "
            f"a relation module) **{t['verdict']}** against {LABELS[last.best]} at "
            f"{last.seen}× (click GAUC {_gap(t)})."
        )
    return lines


def target_line(verdict: str | None, where: str, wanted: tuple[str, ...]) -> str:
    """Whether a target verdict was met, said the same way in every report."""
    if verdict is None:
        return f"Target at {where}: not run."
    met = "met" if verdict in wanted else "**not met**"
    return f"Target at {where} (best IFA variant {' or '.join(wanted)}): {met} ({verdict})."


# -- report -----------------------------------------------------------------------------------


def curve_table(points: Sequence[Point]) -> str:
    """Click GAUC [95% interval] per network and cut, then the oracle and the verdict row."""
    nets = [n for n in points[0].scored.seeds]
    head = "| model | " + " | ".join(f"{p.seen}× ({p.requests_seen:,})" for p in points) + " |"
    lines = [head, "|---" * (len(points) + 1) + "|"]
    for net in nets:
        cells = []
        for p in points:
            mean = float(np.mean(p.scored.point[net]["gauc"]["click"]))
            low, high = interval(p.scored.replicates[net]["gauc"]["click"])
            cells.append(f"{mean:.4f} [{low:.4f}, {high:.4f}]")
        lines.append(f"| {LABELS[net]} | " + " | ".join(cells) + " |")
    oracle = [p.scored.oracle["gauc"]["click"] if p.scored.oracle else math.nan for p in points]
    lines.append("| oracle (true probabilities) | " + " | ".join(f"{v:.4f}" for v in oracle) + " |")
    verdicts = []
    for p in points:
        variant = best_ifa(p.scored)
        t = p.tests.get(variant or "", {}).get("gauc", {}).get("click")
        verdicts.append(
            f"{LABELS[variant]} {t['verdict']} vs {LABELS[p.best]}" if variant and t else "—"
        )
    lines.append("| best IFA vs best baseline | " + " | ".join(verdicts) + " |")
    return "\n".join(lines)


CHANCE_GAUC = 0.55
"""A click GAUC at or below this is a run that collapsed to chance: the plot marks it at the
bottom of the axis instead of stretching the axis down to it."""


def plot_curve(points: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Click GAUC against requests seen, one line per network with its 95% bootstrap band, from
    the results data (``curve.json``'s ``points``), so the plot can be redrawn from the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = sorted(points, key=int)
    x = [points[c]["requests_seen"] for c in cuts]
    nets = list(points[cuts[0]]["metrics"])
    series = {net: [points[c]["metrics"][net]["gauc"]["click"] for c in cuts] for net in nets}
    healthy = [s["ci"][0] for runs in series.values() for s in runs if s["mean"] > CHANCE_GAUC]
    bottom = min(healthy) - 0.01
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, net in enumerate(nets):
        means = [s["mean"] if s["mean"] > CHANCE_GAUC else math.nan for s in series[net]]
        collapsed = [c for c, s in zip(cuts, series[net], strict=True) if s["mean"] <= CHANCE_GAUC]
        label = LABELS[net]
        if collapsed:
            label += f" (at chance from {collapsed[0]}×: ▼)"
        colour = colours[i % len(colours)]
        style = "-" if net in TESTED_IFA else "--"
        ax.plot(x, means, style, marker="o", markersize=3, label=label, color=colour)
        low = [s["ci"][0] if s["mean"] > CHANCE_GAUC else math.nan for s in series[net]]
        high = [s["ci"][1] if s["mean"] > CHANCE_GAUC else math.nan for s in series[net]]
        ax.fill_between(x, low, high, color=colour, alpha=0.12)
        down = [xi for xi, s in zip(x, series[net], strict=True) if s["mean"] <= CHANCE_GAUC]
        ax.plot(down, [bottom + 0.003] * len(down), "v", color=colour, markersize=7)
    if all(points[c].get("oracle") for c in cuts):
        oracle = [points[c]["oracle"]["gauc"]["click"] for c in cuts]
        ax.plot(x, oracle, ":", color="black", label="oracle")
    ax.set_ylim(bottom=bottom)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{c}×\n{xi:,}" for c, xi in zip(cuts, x, strict=True)])
    ax.set_xlabel("requests seen before the scored window")
    ax.set_ylabel("click GAUC (impression-weighted)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve(options: Options) -> Report:
    base = options.presets[0] if options.presets else CURVE_BASE
    preset = scaled(base, CURVE_UNITS, options.unit_users, f"curve_{base}")
    world = ensure_world(preset, WORLD_SEED, options.worlds)
    nets = options.nets or CURVE_NETS
    n_requests = world_requests(world)
    points: list[Point] = []
    for seen in CUTS:
        lo, hi = window(n_requests, CURVE_UNITS, seen)
        scored = score_world(options, world, CURVE, nets, N_REPLICATES, (lo, hi))
        if scored is None:
            break
        best = best_baseline(scored)
        points.append(Point(seen, lo, scored, best, comparisons(scored, TESTED_IFA, best)))
    unit = n_requests / CURVE_UNITS
    setup = (
        f"**Setup.** World `{world}`: preset {base} with {preset.n_users:,} users "
        f"({CURVE_UNITS} units of {preset.n_users // CURVE_UNITS:,} users; a unit is the study "
        f"world's size, here {unit:,.0f} requests), seed {WORLD_SEED}, {n_requests:,} requests. "
        f"One streaming pass per network and seed (each batch scored, then trained on; batch "
        f"{CURVE.batch_size}, learning rate {CURVE.lr:g}, max_history = {CURVE.max_history}, "
        f"shared settings {dict(CURVE.net_overrides)}). The point at c× scores the predictions "
        f"for the unit of requests after the first c units (a model that trained on c units "
        f"predicts them, before it trains on them). {METRIC_DEFINITIONS} Intervals: "
        f"{N_REPLICATES} bootstrap replicates over the window's requests, shared by every "
        f"network (paired); verdicts: wins / loses when the 95% interval of the paired click "
        f"GAUC difference excludes 0, ties otherwise. The best fair baseline and the best IFA "
        f"variant are picked per window by mean click GAUC (on the scored data: this favours "
        f"the baseline as much as IFA). Requested seeds {', '.join(map(str, options.seeds))}."
    )
    data: dict[str, Any] = {
        "experiment": "curve",
        "world": str(world),
        "preset": json_safe(preset),
        "protocol": asdict(CURVE),
        "seeds_requested": list(options.seeds),
        "replicates": N_REPLICATES,
        "labels": LABELS,
        "unit_requests": unit,
        "points": {},
    }
    if not points:
        data["training_seconds"] = {"runs": 0, "seconds": 0.0}
        return Report("curve", CURVE_TITLE, [setup, "Not run (no cached run)."], data)
    last = points[-1]
    variant = best_ifa(last.scored)
    verdict = last.tests[variant]["gauc"]["click"]["verdict"] if variant in last.tests else None
    lines = [
        *headlines(points),
        target_line(verdict, f"{last.seen}×", ("wins", "ties")),
    ]
    data["training_seconds"] = training_seconds(last.scored.runs)
    sections = [
        setup,
        ran_line(data["training_seconds"], _seed_note(last.scored), options.workers),
        "**Headlines** (generated from the numbers below):\n\n"
        + "\n".join(f"- {line}" for line in lines),
        "![click GAUC against requests seen](curve.png)\n\n**Click GAUC** (impression-weighted) "
        "[95% bootstrap interval] by requests seen before the window; seeds run: "
        + _seed_note(last.scored)
        + "\n\n"
        + curve_table(points),
    ]
    for p in points:
        data["points"][str(p.seen)] = {
            "requests_seen": p.requests_seen,
            "versus_category_rule": learned_against_rule(p.scored),
            **_world_data(p.scored, p.best, p.tests),
        }
        if p.seen in DETAILED_CUTS:
            sections.append(
                _world_section(
                    f"After {p.seen}× ({p.requests_seen:,} requests seen)",
                    world,
                    p.scored,
                    p.best,
                    p.tests,
                )
            )
    data["headlines"] = lines
    title = f"Click GAUC against requests seen ({base})"
    plot_curve(data["points"], options.out / "curve.png", title)
    return Report("curve", CURVE_TITLE, sections, data)


CURVE_TITLE = "Learning curve: the fair comparison at 1× to 16× the study's requests"


def json_safe(preset: Preset) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(asdict(preset)))
    return loaded
