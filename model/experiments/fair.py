"""The fair comparison: published baselines with the information their production forms have,
against the paper's IFA, IFA+degree and IFA's variants (time decay, the exact-match channel), on
worlds the method was not tuned on.

* ``fair`` — every network of :data:`FAIR_NETS` on each world preset of :data:`FAIR_PRESETS`
  (generated with :data:`WORLD_SEED`; IFA's kernel, degree and RAM defaults were chosen on the
  tuning world ``medium-0``, see results/design_sweeps.md, and nothing is chosen here).
* ``fair_movielens`` — the same networks on MovieLens 100K, with IFA's ablations.

IFA without RAM is among the networks, so that its comparison with the baselines (none of which
has a relation module) isolates the full-sequence read.

Per world, network and objective: pooled AUC, per-request GAUC weighted by impressions and by
clicks, log loss and ECE over equal-mass bins, as mean ± std over seeds and a 95% bootstrap
interval over requests (the replicates
resample requests; one set of replicates per world, shared by every network, so differences
are paired). The best fair baseline of a world is the baseline with the highest mean click
GAUC (ranking within a request by p_imp · p_click is what the service serves); picking it on
the evaluated data favours the baseline, never IFA. Every IFA row is tested against it: a paired
bootstrap difference whose 95% interval excludes zero is a win or a loss, otherwise a tie. The
best IFA variant of a world is picked the same way among the IFA rows (on the evaluated data, as
the baseline is), so the headline verdict is best against best. The bootstrap covers the request
sample, not model initialisation; the seed std beside it does that where there is more than one
seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.bootstrap import (
    N_REPLICATES,
    RequestStats,
    auc_replicates,
    interval,
    replicate_counts,
    two_sided_p,
)
from model.data import world_actions
from model.experiments.common import (
    MOVIELENS,
    SYNTHETIC,
    Options,
    Protocol,
    Report,
    ensure_movielens,
    ensure_world,
    mean_std,
    run_dir,
    run_grid,
    training_seconds,
)
from model.features import OBJECTIVES, objectives_of
from model.metrics import CALIBRATION_BINS, request_index, roc_auc

FAIR_NETS: tuple[str, ...] = (
    "avgpool", "din", "din_softmax", "sim_hard", "sim_hard_mass", "sim_soft",
    "twin", "twin_k100", "twin_k200", "twin_mass", "twin_k100_mass", "twin_k200_mass",
    "ifa_no_degree", "ifa", "ifa_no_ram", "ifa_decay", "ifa_channel", "ifa_channel_decay",
)  # fmt: skip
IFA_VARIANTS: tuple[str, ...] = ("ifa_decay", "ifa_channel", "ifa_channel_decay")
"""IFA+degree with its learned time decay, with the category's exact-match channel, and both."""
IFA_NETS: tuple[str, ...] = ("ifa_no_degree", "ifa", "ifa_no_ram", *IFA_VARIANTS)
IFA_ROWS: tuple[str, ...] = ("ifa_no_degree", "ifa", *IFA_VARIANTS)
"""The IFA rows the best IFA variant is chosen from."""
TESTED_IFA: tuple[str, ...] = (*IFA_ROWS, "ifa_no_ram")
"""The IFA rows tested against the best fair baseline of every world: without RAM too, so that
the comparison with the baselines (none of which has RAM) isolates the full-sequence read."""
CONTRIBUTIONS: tuple[tuple[str, str, str], ...] = (
    ("ifa_channel", "ifa", "channel"),
    ("ifa_decay", "ifa", "decay"),
    ("ifa_channel_decay", "ifa_channel", "decay with the channel"),
    ("ifa_channel_decay", "ifa", "channel and decay"),
)
"""(variant, reference, what the difference measures): each addition against IFA+degree."""
MOVIELENS_NETS: tuple[str, ...] = FAIR_NETS
FAIR_PRESETS: tuple[str, ...] = (
    "study_mixed",
    "study_count",
    "study_share",
    "study_recent",
    "study_long",
)
WORLD_SEED = 1
"""Seed of every reported world; the tuning world is medium with seed 0."""
TUNING_WORLD = "medium-0"
FAIR = replace(SYNTHETIC, save_predictions=True)
FAIR_MOVIELENS = replace(MOVIELENS, save_predictions=True)
LONG_WINDOW = 50_000
PROTOCOLS = {"study_long": replace(FAIR, max_history=LONG_WINDOW)}
"""A world's own protocol where the default window would hide what it tests: the long-history
world keeps whole histories (its longest is 50,000 events), so the service serving such a model
keeps that window too (the exported manifest says so)."""
METRICS: tuple[str, ...] = ("auc", "gauc", "gauc_click", "logloss", "ece")
"""gauc weighs each request by its impressions, gauc_click by its clicks."""
LOWER_IS_BETTER = frozenset({"logloss", "ece"})
SELECTION = ("click", "gauc")
"""(objective, metric) that names the best fair baseline of a world."""
LABELS = {
    "avgpool": "AvgPooling",
    "din": "DIN (paper: activation unit)",
    "din_softmax": "DIN-softmax",
    "sim_hard": "SIM-hard",
    "sim_hard_mass": "SIM-hard+mass",
    "sim_soft": "SIM-soft",
    "twin": "TWIN K=50",
    "twin_k100": "TWIN K=100",
    "twin_k200": "TWIN K=200",
    "twin_mass": "TWIN K=50+mass",
    "twin_k100_mass": "TWIN K=100+mass",
    "twin_k200_mass": "TWIN K=200+mass",
    "ifa_no_degree": "IFA (paper)",
    "ifa": "IFA+degree",
    "ifa_no_ram": "IFA+degree without RAM",
    "ifa_decay": "IFA+degree+decay",
    "ifa_channel": "IFA+degree+channel",
    "ifa_channel_decay": "IFA+degree+channel+decay",
}
WORLD_NOTES = {
    "study_mixed": "today's truth: relevance = log1p(E) − 0.5·log1p(W) (ν = 0.5)",
    "study_count": "pure count: relevance = log1p(E) (ν = 0)",
    "study_share": "pure share: relevance = log1p(E) − log1p(W) (ν = 1)",
    "study_recent": "recency dominates: the share of the last 20 events related to the "
    "candidate drives every action (weights 3 / 2 / 2), whole-history engagement weighs 0.3",
    "movielens": "real ratings (MovieLens 100K), no known truth",
    "study_long": "long lifelong histories: 1,000 users, median about 3,000 events, up to "
    f"50,000, all kept (max_history = {LONG_WINDOW:,})",
}


@dataclass
class Scored:
    """One world's evaluation of every run found."""

    seeds: dict[str, list[int]]
    point: dict[str, dict[str, dict[str, list[float]]]]
    """net -> metric -> objective -> value per seed."""
    replicates: dict[str, dict[str, dict[str, np.ndarray]]]
    """net -> metric -> objective -> (B,) seed-mean bootstrap replicates."""
    oracle: dict[str, dict[str, float]] | None
    n_requests: int
    n_candidates: int
    runs: dict[str, dict[int, dict[str, Any]]]
    """net -> seed -> the run's metrics.json."""
    other_oracles: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """label -> metric -> objective: oracles with less information than the truth's."""
    objectives: tuple[str, ...] = OBJECTIVES
    """The world's objectives, in the predictions' column order."""


Oracle = Callable[[dict[str, np.ndarray]], np.ndarray]
"""A run's predictions (the arrays of predictions.npz) -> (n, objectives) probabilities."""


def _predictions(path: Path, window: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The arrays of predictions.npz; with ``window`` (lo, hi) only the predictions for requests
    at stream positions lo <= row < hi."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if window is None:
        return arrays
    rows = arrays["request_rows"]
    inside = (rows >= window[0]) & (rows < window[1])
    return {k: v[inside] for k, v in arrays.items()}


def _evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    group: np.ndarray,
    weight: np.ndarray,
    click_weight: np.ndarray,
    counts: np.ndarray,
    objectives: Sequence[str],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """Point metrics and bootstrap replicates of one run: metric -> objective -> value."""
    point: dict[str, dict[str, float]] = {m: {} for m in METRICS}
    reps: dict[str, dict[str, np.ndarray]] = {m: {} for m in METRICS}
    ones = np.ones((1, counts.shape[1]))
    for k, objective in enumerate(objectives):
        stats = RequestStats.of(labels[:, k], scores[:, k], group, weight, click_weight)
        plain, resampled = stats.metrics(ones), stats.metrics(counts)
        for m in ("gauc", "gauc_click", "logloss", "ece"):
            point[m][objective] = float(plain[m][0])
            reps[m][objective] = resampled[m]
        point["auc"][objective] = roc_auc(labels[:, k], scores[:, k])
        reps["auc"][objective] = auc_replicates(labels[:, k], scores[:, k], group, counts)
    return point, reps


def score_world(
    options: Options,
    world: Path,
    protocol: Protocol,
    nets: Sequence[str],
    n_replicates: int,
    window: tuple[int, int] | None = None,
    oracles: Mapping[str, Oracle] | None = None,
) -> Scored | None:
    """Train (or take from the cache) every run, then score them all on shared replicates.

    ``window`` (lo, hi): score only the requests at stream positions lo <= row < hi (a point of
    a learning curve). ``oracles``: further oracle rows, label -> probabilities from the
    predictions. None when there is no run at all (``--cached-only`` before anything was
    trained)."""
    grid = run_grid(options, world, nets, options.seeds, protocol, options.workers)
    objectives = objectives_of(world_actions(world))
    seeds = {net: sorted(grid[net]) for net in nets if grid[net]}
    if not seeds:
        return None
    point: dict[str, dict[str, dict[str, list[float]]]] = {}
    replicates: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    reference: np.ndarray | None = None
    oracle = None
    other_oracles: dict[str, dict[str, dict[str, float]]] = {}
    counts = np.zeros((0, 0))
    group = weight = click_weight = np.zeros(0)
    click = objectives.index("click")
    for net, net_seeds in seeds.items():
        per_seed = []
        for seed in net_seeds:
            path = run_dir(options, world, protocol, net, seed) / "predictions.npz"
            p = _predictions(path, window)
            if not len(p["request_rows"]):
                raise ValueError(f"{path} holds no prediction in the window {window}")
            if reference is None:
                reference = p["request_rows"]
                group = request_index(reference)
                weight = np.bincount(group, weights=p["labels"][:, 0]).astype(np.float64)
                click_weight = np.bincount(group, weights=p["labels"][:, click]).astype(np.float64)
                counts = replicate_counts(int(group.max()) + 1, n_replicates, seed=0)
                if not np.isnan(p["truth"]).any():
                    truths = {"": p["truth"], **{k: f(p) for k, f in (oracles or {}).items()}}
                    evaluated = {
                        k: _evaluate(
                            p["labels"], t, group, weight, click_weight, counts[:1], objectives
                        )[0]
                        for k, t in truths.items()
                    }
                    oracle = evaluated.pop("")
                    other_oracles = evaluated
            elif not np.array_equal(p["request_rows"], reference):
                raise ValueError(f"{net} seed {seed} was evaluated on other requests")
            per_seed.append(
                _evaluate(p["labels"], p["scores"], group, weight, click_weight, counts, objectives)
            )
        point[net] = {m: {o: [s[0][m][o] for s in per_seed] for o in objectives} for m in METRICS}
        replicates[net] = {
            m: {o: np.mean([s[1][m][o] for s in per_seed], axis=0) for o in objectives}
            for m in METRICS
        }
    assert reference is not None
    runs = {net: grid[net] for net in seeds}
    n_requests = int(group.max()) + 1
    return Scored(
        seeds,
        point,
        replicates,
        oracle,
        n_requests,
        len(reference),
        runs,
        other_oracles,
        objectives,
    )


def paired(scored: Scored, better: str, worse: str, metric: str, objective: str) -> dict[str, Any]:
    """``better`` − ``worse`` on one metric, signed so that positive favours ``better``."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    d = sign * (
        scored.replicates[better][metric][objective] - scored.replicates[worse][metric][objective]
    )
    gap = sign * (
        np.mean(scored.point[better][metric][objective])
        - np.mean(scored.point[worse][metric][objective])
    )
    low, high = interval(d)
    verdict = "wins" if low > 0 else "loses" if high < 0 else "ties"
    return {"gap": float(gap), "ci": [low, high], "p": two_sided_p(d), "verdict": verdict}


def _n_baselines(scored: Scored) -> int:
    return sum(1 for n in scored.seeds if n not in IFA_NETS)


def best_baseline(scored: Scored) -> str:
    objective, metric = SELECTION
    baselines = [n for n in scored.seeds if n not in IFA_NETS]
    return max(baselines, key=lambda n: float(np.mean(scored.point[n][metric][objective])))


def best_ifa(scored: Scored) -> str | None:
    """The IFA row with the highest mean click GAUC (chosen like the best baseline)."""
    objective, metric = SELECTION
    rows = [n for n in IFA_ROWS if n in scored.seeds]
    if not rows:
        return None
    return max(rows, key=lambda n: float(np.mean(scored.point[n][metric][objective])))


def contributions(scored: Scored) -> dict[str, Any]:
    """Paired differences of each IFA addition against the row without it."""
    return {
        what: {
            "variant": variant,
            "reference": reference,
            "tests": {
                m: {o: paired(scored, variant, reference, m, o) for o in scored.objectives}
                for m in METRICS
            },
        }
        for variant, reference, what in CONTRIBUTIONS
        if variant in scored.seeds and reference in scored.seeds
    }


def contribution_table(found: dict[str, Any]) -> str:
    lines = [
        "| addition | compared | click ΔGAUC | verdict | impression ΔGAUC | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for what, c in found.items():
        gauc = c["tests"]["gauc"]
        lines.append(
            f"| {what} | {LABELS[c['variant']]} − {LABELS[c['reference']]} | "
            f"{_gap(gauc['click'])} | **{gauc['click']['verdict']}** | "
            f"{_gap(gauc['impression'])} | **{gauc['impression']['verdict']}** |"
        )
    return "\n".join(lines)


# -- formatting -----------------------------------------------------------------------------


def _cell(scored: Scored, net: str, metric: str, objective: str) -> str:
    mean, std = mean_std(scored.point[net][metric][objective])
    low, high = interval(scored.replicates[net][metric][objective])
    spread = f" ± {std:.4f}" if len(scored.seeds[net]) > 1 else ""
    return f"{mean:.4f}{spread} [{low:.4f}, {high:.4f}]"


def metric_table(scored: Scored, objective: str) -> str:
    lines = [
        f"**{objective}** — mean{' ± seed std' if _multi_seed(scored) else ''} "
        "[95% bootstrap interval over requests]\n",
        "| model | seeds | AUC | GAUC (impressions) | GAUC (clicks) | log loss | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for net in scored.seeds:
        cells = " | ".join(_cell(scored, net, m, objective) for m in METRICS)
        seeds = ",".join(map(str, scored.seeds[net]))
        lines.append(f"| {LABELS[net]} | {seeds} | {cells} |")
    oracles = {"oracle (true probabilities)": scored.oracle, **scored.other_oracles}
    for label, values in oracles.items():
        if values is not None:
            cells = " | ".join(f"{values[m][objective]:.4f}" for m in METRICS)
            lines.append(f"| {label} | — | {cells} |")
    return "\n".join(lines)


def _multi_seed(scored: Scored) -> bool:
    return any(len(s) > 1 for s in scored.seeds.values())


def _gap(g: dict[str, Any]) -> str:
    return f"{g['gap']:+.4f} [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}] p={g['p']:.3f}"


def comparisons(scored: Scored, rivals: Sequence[str], against: str) -> dict[str, Any]:
    return {
        net: {
            m: {o: paired(scored, net, against, m, o) for o in scored.objectives} for m in METRICS
        }
        for net in rivals
        if net in scored.seeds and net != against
    }


def comparison_table(tests: dict[str, Any], against: str) -> str:
    lines = [
        f"| model − {LABELS[against]} | objective | ΔAUC | ΔGAUC | Δ log loss (− = better) | "
        "verdict on GAUC |",
        "|---|---|---|---|---|---|",
    ]
    for net, by_metric in tests.items():
        for o in by_metric["gauc"]:
            loss = by_metric["logloss"][o]
            lines.append(
                f"| {LABELS[net]} | {o} | {_gap(by_metric['auc'][o])} | "
                f"{_gap(by_metric['gauc'][o])} | {-loss['gap']:+.4f} | "
                f"**{by_metric['gauc'][o]['verdict']}** |"
            )
    return "\n".join(lines)


def _k_sweep(scored: Scored) -> str:
    """Whether a larger K or the mass feature lifts TWIN (click GAUC), stated from the numbers."""

    def value(net: str) -> float | None:
        if net not in scored.seeds:
            return None
        return float(np.mean(scored.point[net]["gauc"]["click"]))

    parts = []
    for suffix, name in (("", "TWIN"), ("_mass", "TWIN+mass")):
        nets = [f"twin{suffix}", f"twin_k100{suffix}", f"twin_k200{suffix}"]
        values = [value(n) for n in nets]
        if all(v is not None for v in values):
            parts.append(
                f"{name} click GAUC at K = 50 / 100 / 200: "
                + " / ".join(f"{v:.4f}" for v in values if v is not None)
            )
    return "; ".join(parts) + "." if parts else ""


# -- reports --------------------------------------------------------------------------------


def _world_section(name: str, world: Path, scored: Scored, best: str, tests: dict[str, Any]) -> str:
    note = WORLD_NOTES.get(name)
    head = (
        f"## {name}{f': {note}' if note else ''}\n\n"
        f"World `{world}`; {scored.n_requests:,} evaluated requests, "
        f"{scored.n_candidates:,} candidates."
    )
    # The selection objective first, then the rest in the world's order.
    first = SELECTION[0]
    tables = [
        metric_table(scored, o) for o in (first, *(o for o in scored.objectives if o != first))
    ]
    verdicts = ", ".join(
        f"{LABELS[n]} **{t['gauc']['click']['verdict']}** (click GAUC {_gap(t['gauc']['click'])})"
        for n, t in tests.items()
    )
    summary = (
        f"**Best fair baseline** (highest mean click GAUC among the {_n_baselines(scored)} "
        f"baselines run): {LABELS[best]}. Against it: "
        f"{verdicts}. {_k_sweep(scored)}"
    )
    best_variant = best_ifa(scored)
    if best_variant is not None and best_variant in tests:
        t = tests[best_variant]["gauc"]
        summary += (
            f"\n\n**Best IFA variant** (highest mean click GAUC among the IFA rows): "
            f"{LABELS[best_variant]}: click **{t['click']['verdict']}** "
            f"({_gap(t['click'])}), impression **{t['impression']['verdict']}** "
            f"({_gap(t['impression'])})."
        )
    parts = [head, *tables, summary, comparison_table(tests, best)]
    found = contributions(scored)
    if found:
        parts.append(
            "**What each addition to IFA+degree brings** (paired, the same replicates):\n\n"
            + contribution_table(found)
        )
    return "\n\n".join(parts)


def _setup(protocol: Protocol, options: Options, n_replicates: int, what: str) -> str:
    return (
        f"**Setup.** {what} Streaming protocol (IFA §5.1) as in Table 2: each batch scored, then "
        f"trained on; one pass{_burn_in_note(protocol)}, batch {protocol.batch_size}, learning "
        f"rate {protocol.lr:g}, "
        f"max_history = {protocol.max_history} (the window the service keeps), shared network "
        f"settings {dict(protocol.net_overrides)}, the first {protocol.warmup:.0%} of batches "
        "not evaluated. Scores: impression by p_imp, each action by p_imp · p(action | imp), "
        f"against the joint labels. {METRIC_DEFINITIONS} Intervals: {n_replicates} bootstrap "
        "replicates over "
        "requests, shared by all models of a world (paired); verdicts: wins / loses when the "
        "95% interval of the paired GAUC difference excludes 0, ties otherwise. Requested "
        f"seeds {', '.join(map(str, options.seeds))}; the seeds column says which ran."
    )


def _burn_in_note(protocol: Protocol) -> str:
    if not protocol.burn_in:
        return ""
    return (
        f" after {protocol.burn_in} burn-in passes over the first {protocol.warmup:.0%} of the "
        "stream (every model alike; never on a request before it is scored)"
    )


def _header(name: str, protocol: Protocol, options: Options) -> dict[str, Any]:
    return {
        "experiment": name,
        "protocol": asdict(protocol),
        "seeds_requested": list(options.seeds),
        "world_seed": WORLD_SEED,
        "tuning_world": TUNING_WORLD,
        "labels": LABELS,
        "selection": list(SELECTION),
        "replicates": N_REPLICATES,
    }


def _world_data(scored: Scored, best: str, tests: dict[str, Any]) -> dict[str, Any]:
    def stats(values: dict[str, dict[str, list[float]]], reps: Any) -> dict[str, Any]:
        return {
            m: {
                o: {
                    "per_seed": values[m][o],
                    "mean": float(np.mean(values[m][o])),
                    "ci": list(interval(reps[m][o])),
                }
                for o in scored.objectives
            }
            for m in METRICS
        }

    return {
        "seeds": scored.seeds,
        "n_requests": scored.n_requests,
        "n_candidates": scored.n_candidates,
        "metrics": {n: stats(scored.point[n], scored.replicates[n]) for n in scored.seeds},
        "oracle": scored.oracle,
        "best_fair_baseline": best,
        "best_ifa_variant": best_ifa(scored),
        "against_best": tests,
        "contributions": contributions(scored),
    }


def fair(options: Options) -> Report:
    if options.world is not None:
        return fair_world(options, options.world)
    presets = options.presets or FAIR_PRESETS
    sections: list[str] = []
    data: dict[str, Any] = {**_header("fair", options.protocol(FAIR), options), "worlds": {}}
    rows = []
    seconds = {"runs": 0, "seconds": 0.0}
    for preset in presets:
        world = ensure_world(preset, WORLD_SEED, options.worlds)
        protocol = options.protocol(PROTOCOLS.get(preset, FAIR))
        scored = score_world(options, world, protocol, FAIR_NETS, N_REPLICATES)
        if scored is None:
            sections.append(f"## {preset}: {WORLD_NOTES.get(preset, '')}\n\nNot run.")
            rows.append(f"| {preset} | — | not run | not run | none |")
            continue
        best = best_baseline(scored)
        tests = comparisons(scored, TESTED_IFA, best)
        sections.append(_world_section(preset, world, scored, best, tests))
        data["worlds"][preset] = _world_data(scored, best, tests)
        rows.append(_summary_row(preset, scored, best, tests))
        grid_seconds = training_seconds(scored.runs)
        seconds["runs"] += grid_seconds["runs"]
        seconds["seconds"] += grid_seconds["seconds"]
    data["training_seconds"] = seconds
    summary = (
        "**Where IFA wins, ties and loses** (click GAUC against the best fair baseline of each "
        "world; paired bootstrap, 95%), and the best IFA variant's verdicts on click and "
        "impression GAUC:\n\n" + SUMMARY_HEAD + "\n".join(rows)
    )
    what = (
        f"Worlds: presets {', '.join(presets)} generated with seed {WORLD_SEED}. Design choices "
        f"(IFA's relu kernel, its degree feature, RAM without degree, K = L = 50) were made on "
        f"the tuning world `{TUNING_WORLD}` (results/design_sweeps.md); none was made on these "
        "worlds, which differ from it in size and, except study_mixed, in how relevance depends "
        "on the history."
    )
    return Report(
        f"fair{options.suffix}",
        "Fair comparison: published baselines, +mass variants, IFA (paper), IFA+degree and "
        "IFA's variants",
        [_setup(options.protocol(FAIR), options, N_REPLICATES, what), summary, *sections],
        data,
    )


def study_nets(options: Options, nets: Sequence[str]) -> tuple[str, ...]:
    """``options.nets`` where given (each one of ``nets``), else ``nets``."""
    unknown = sorted(set(options.nets) - set(nets))
    if unknown:
        raise ValueError(f"networks {unknown} are not in this study; it has {list(nets)}")
    chosen = tuple(n for n in nets if n in options.nets) if options.nets else tuple(nets)
    if not any(n in IFA_ROWS for n in chosen) or all(n in IFA_NETS for n in chosen):
        raise ValueError("the comparison needs at least one baseline and one IFA row")
    return chosen


def fair_world(options: Options, world: Path) -> Report:
    """The fair comparison on one world of one's own: its logged outcomes, no oracle."""
    objectives = objectives_of(world_actions(world))
    if SELECTION[0] not in objectives:
        raise ValueError(
            f"the fair comparison picks the best baseline by {SELECTION[0]} GAUC; "
            f"{world} has the actions {list(objectives)}"
        )
    protocol = options.protocol(FAIR)
    nets = study_nets(options, FAIR_NETS)
    scored = score_world(options, world, protocol, nets, N_REPLICATES)
    if scored is None:
        raise RuntimeError(f"no runs on {world}: train them (leave out --cached-only)")
    best = best_baseline(scored)
    tests = comparisons(scored, IFA_ROWS, best)
    what = (
        f"World `{world}`, objectives {', '.join(objectives)}: logged outcomes only (no "
        "oracle). Networks: " + ", ".join(LABELS[n] for n in nets) + "."
    )
    sections = [
        _setup(protocol, options, N_REPLICATES, what),
        "**Against the best fair baseline** (click GAUC; the best IFA variant also on "
        "impression):\n\n" + SUMMARY_HEAD + _summary_row(world.name, scored, best, tests),
        _world_section(world.name, world, scored, best, tests),
    ]
    data = {
        **_header("fair", protocol, options),
        "world": str(world),
        **_world_data(scored, best, tests),
        "training_seconds": training_seconds(scored.runs),
    }
    return Report(
        f"fair_{world.name}{options.suffix}",
        f"Fair comparison on {world.name}: published baselines against IFA",
        sections,
        data,
    )


def fair_movielens(options: Options) -> Report:
    world = ensure_movielens(options.worlds)
    protocol = options.protocol(FAIR_MOVIELENS)
    scored = score_world(options, world, protocol, MOVIELENS_NETS, N_REPLICATES)
    if scored is None:
        raise RuntimeError(f"no runs on {world}: train them (leave out --cached-only)")
    best = best_baseline(scored)
    tests = comparisons(scored, TESTED_IFA, best)
    ablations = comparisons(scored, ("ifa",), "ifa_no_degree")
    ablations_ram = comparisons(scored, ("ifa",), "ifa_no_ram")
    what = (
        "MovieLens 100K (model/movielens.py): a request's candidates are the user's next 5 "
        "rated films (impressed) and 20 films that exist and are unrated by the user at the "
        "request time, drawn by popularity as of that time. No ground truth: no oracle row."
    )
    sections = [
        _setup(protocol, options, N_REPLICATES, what),
        "**Against the best fair baseline** (click GAUC; the best IFA variant also on "
        "impression):\n\n" + SUMMARY_HEAD + _summary_row("movielens", scored, best, tests),
        _world_section("movielens", world, scored, best, tests),
        "**Ablations** (IFA+degree against the paper's IFA: the degree's contribution; and "
        "against IFA+degree without RAM: RAM's):\n\n"
        + comparison_table(ablations, "ifa_no_degree")
        + "\n\n"
        + comparison_table(ablations_ram, "ifa_no_ram"),
    ]
    data = {
        **_header("fair_movielens", protocol, options),
        "world": str(world),
        **_world_data(scored, best, tests),
        "ablations": {"degree": ablations, "ram": ablations_ram},
        "training_seconds": training_seconds(scored.runs),
    }
    return Report(
        f"fair_movielens{options.suffix}",
        "Fair comparison on MovieLens 100K, with IFA's ablations",
        sections,
        data,
    )


METRIC_DEFINITIONS = (
    "GAUC = Σ_r w_r AUC_r / Σ_r w_r over the requests with both classes: GAUC (impressions) "
    "weighs a request by its impressions (every request of these worlds shows the same number, "
    "so it is the plain mean over requests), GAUC (clicks) by its clicks (requests the user "
    "clicked in count more, requests without a click not at all). Log loss of the same "
    f"probabilities; ECE over {CALIBRATION_BINS} equal-mass bins of each run's predictions "
    "(fixed across replicates)."
)
SUMMARY_HEAD = (
    "| world | best fair baseline | IFA (paper) | IFA+degree | best IFA variant | its click | "
    "its impression | seeds run |\n|---|---|---|---|---|---|---|---|\n"
)


def _summary_row(name: str, scored: Scored, best: str, tests: dict[str, Any]) -> str:
    def verdict(net: str | None, objective: str) -> str:
        if net is None or net not in tests:
            return "not run"
        t = tests[net]["gauc"][objective]
        return f"{t['verdict']} ({t['gap']:+.4f})"

    variant = best_ifa(scored)
    return (
        f"| {name} | {LABELS[best]} | {verdict('ifa_no_degree', 'click')} | "
        f"{verdict('ifa', 'click')} | {LABELS[variant] if variant else '—'} | "
        f"{verdict(variant, 'click')} | {verdict(variant, 'impression')} | {_seed_note(scored)} |"
    )


def _seed_note(scored: Scored) -> str:
    """Which seeds ran, e.g. "0, 1, 2: 3 models; 0: 11 models"."""
    by_seeds: dict[tuple[int, ...], int] = {}
    for seeds in scored.seeds.values():
        by_seeds[tuple(seeds)] = by_seeds.get(tuple(seeds), 0) + 1
    return "; ".join(
        f"{', '.join(map(str, s))}: {n} model{'s' if n > 1 else ''}"
        for s, n in sorted(by_seeds.items(), key=lambda kv: -len(kv[0]))
    )
