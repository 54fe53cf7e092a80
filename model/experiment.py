"""The paper's experiments (IFA §5) on our worlds: ``python -m model.experiment NAME``.

* ``table2`` — every model × objective AUC (mean ± std over seeds) on the medium synthetic
  world, the oracle as the last row, and each model's training throughput.
* ``table3`` — the ablations: IFA, IFA without FSM (TWIN's two-step attention + RAM), IFA
  without FSM and RAM (which is TWIN: its runs are TWIN's, as the paper says of its Table 3).
* ``history_length`` — AUC by request history-length bucket for IFA, TWIN and SIM-hard (reuses
  the table2 runs: every run records its per-bucket AUCs).
* ``movielens`` — the table2 models and protocol on MovieLens 100K (no ground truth, no oracle).

Each writes ``results/<name>.md``, ``.json`` and ``.png``. Worlds are generated if missing and
cached under ``data/worlds/<preset>-<seed>/``; runs are cached under
``runs/experiments/<world>/<protocol>/<net>-seed<k>/``, so an experiment re-run (or another
experiment needing the same runs) trains nothing twice. Runs go through a pool of worker
processes, one thread each: on a small shared machine, processes keep the cores busier than
intra-op threads of one process.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.features import OBJECTIVES
from model.nets import net_config
from model.train import TrainSettings, train

RESULTS = Path("results")
WORLDS = Path("data/worlds")
RUNS = Path("runs/experiments")
SEEDS: tuple[int, ...] = (0, 1, 2)

TABLE2_NETS: tuple[str, ...] = ("avgpool", "din", "sim_hard", "sim_soft", "twin", "ifa")
TABLE3_NETS: tuple[str, ...] = ("ifa", "ifa_no_fsm", "ifa_no_fsm_ram", "ifa_no_degree")
"""The paper's three rows, then IFA without its degree feature (our addition)."""
HISTORY_NETS: tuple[str, ...] = ("ifa", "ifa_no_fsm", "twin", "sim_hard")
SAME_RUNS = {"ifa_no_fsm_ram": "twin"}
"""Registry aliases with identical class and config: their runs are shared, not repeated."""
LABELS = {
    "avgpool": "AvgPooling",
    "din": "DIN",
    "sim_hard": "SIM_hard",
    "sim_soft": "SIM_soft",
    "twin": "TWIN",
    "ifa": "IFA",
    "ifa_no_fsm": "IFA-FSM",
    "ifa_no_fsm_ram": "IFA-FSM-RAM",
    "ifa_no_degree": "IFA-degree",
}
# Cheapest last, so that two workers finish together.
COST_ORDER = (
    "sim_soft", "sim_hard", "ifa_no_fsm", "twin", "ifa", "ifa_no_degree", "din", "avgpool"
)  # fmt: skip


@dataclass(frozen=True)
class Protocol:
    """Training settings shared by every model of an experiment (only the network differs)."""

    batch_size: int = 16
    lr: float = 1e-2
    epochs: int = 1
    max_history: int | None = 1000
    warmup: float = 0.1
    threads: int = 1
    net_overrides: tuple[tuple[str, Any], ...] = (("key_dim", 32),)
    """Config fields set for every network alike (NetConfig fields all of them share)."""
    burn_in: int = 0
    save_predictions: bool = False
    """Keep each run's per-candidate predictions (the fair study's metrics are computed from
    them); not part of the tag: it changes what is written, not what is trained."""

    @property
    def tag(self) -> str:
        """Directory name of this protocol's runs: runs of different protocols never mix."""
        overrides = "_".join(f"{k}{v}" for k, v in self.net_overrides)
        return (
            f"bs{self.batch_size}_lr{self.lr:g}_ep{self.epochs}_hist{self.max_history}_"
            f"warm{self.warmup:g}_burn{self.burn_in}" + (f"_{overrides}" if overrides else "")
        )

    def settings(self, world: Path, net: str, seed: int, out: Path) -> TrainSettings:
        return TrainSettings(
            world=world,
            net=net,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            max_history=self.max_history,
            threads=self.threads,
            warmup=self.warmup,
            net_overrides=dict(self.net_overrides),
            burn_in=self.burn_in,
            out=out,
            save_predictions=self.save_predictions,
            progress=False,
        )


@dataclass(frozen=True)
class Options:
    """Where and how an experiment runs (the command line's choices)."""

    seeds: tuple[int, ...] = SEEDS
    workers: int = 2
    out: Path = RESULTS
    preset: str = "medium"
    """Synthetic world preset (``tiny`` makes a quick smoke run of the whole pipeline)."""
    worlds: Path = WORLDS
    runs: Path = RUNS
    burn_in: int = 0
    """> 0: that many extra passes over the first half of the stream, then evaluation on the
    second half (results named ``<experiment>_burnin<N>``)."""

    @property
    def suffix(self) -> str:
        return f"_burnin{self.burn_in}" if self.burn_in else ""

    def synthetic_world(self) -> Path:
        """The preset's world of seed 0, generated first if missing."""
        return ensure_world(self.preset, 0, self.worlds)

    def protocol(self, base: Protocol) -> Protocol:
        return replace(base, warmup=0.5, burn_in=self.burn_in) if self.burn_in else base


SYNTHETIC = Protocol()
MOVIELENS = Protocol(max_history=None)


# -- worlds and runs ----------------------------------------------------------------------


def ensure_world(preset: str, seed: int, root: Path = WORLDS) -> Path:
    """``root/<preset>-<seed>``, generated first if missing (built aside, then renamed)."""
    from model.world import write_world

    path = root / f"{preset}-{seed}"
    if not (path / "world.json").is_file():
        staging = root / f".{preset}-{seed}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        print(f"generating world {preset} (seed {seed}) into {path}", flush=True)
        write_world(preset, seed, staging)
        staging.rename(path)
    return path


def ensure_movielens(root: Path = WORLDS) -> Path:
    from model.movielens import write_movielens_world

    # The name carries the candidate rule: a world built with the earlier rule (negatives judged
    # over the whole timeline) must not be reused for this one.
    path = root / "movielens-100k-asof"
    if not (path / "world.json").is_file():
        staging = root / f".movielens-100k-asof.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        print(f"converting MovieLens 100K into {path}", flush=True)
        write_movielens_world(staging)
        staging.rename(path)
    return path


def _run(settings: TrainSettings) -> dict[str, Any]:
    """One training run in a worker process; returns its metrics (also written to disk)."""
    return train(settings).to_json()


def _matches(metrics: dict[str, Any], settings: TrainSettings) -> bool:
    """Whether a cached run was trained with these settings (a setting the run predates
    counts as its default) and with the network config they resolve to today, so that a
    changed default in a network's config retrains instead of reusing a stale run."""
    wanted = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    defaults = {f.name: f.default for f in fields(TrainSettings)}
    ignore = {"out", "progress", "save_predictions"}
    saved = metrics.get("settings", {})
    if any(saved.get(k, defaults.get(k)) != v for k, v in wanted.items() if k not in ignore):
        return False
    config = json.loads(json.dumps(asdict(net_config(settings.net, **settings.net_overrides))))
    return bool(metrics.get("config") == config)


def run_grid(
    options: Options,
    world: Path,
    nets: Sequence[str],
    seeds: Sequence[int],
    protocol: Protocol,
    workers: int,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Metrics of every (net, seed): cached where a run with this protocol exists, else trained."""
    results: dict[str, dict[int, dict[str, Any]]] = {net: {} for net in nets}
    pending: list[tuple[str, int, TrainSettings]] = []
    for net in sorted({SAME_RUNS.get(n, n) for n in nets}, key=_cost_rank):
        for seed in seeds:
            out = options.runs / world.name / protocol.tag / f"{net}-seed{seed}"
            settings = protocol.settings(world, net, seed, out)
            cached = out / "metrics.json"
            if cached.is_file() and _matches(json.loads(cached.read_text()), settings):
                _store(results, nets, net, seed, json.loads(cached.read_text()))
            else:
                pending.append((net, seed, settings))
    if pending:
        print(f"{len(pending)} runs to train on {world} with {workers} workers", flush=True)
        started = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_run, s): (net, seed) for net, seed, s in pending}
            for done, future in enumerate(as_completed(futures), start=1):
                net, seed = futures[future]
                metrics = future.result()
                _store(results, nets, net, seed, metrics)
                print(
                    f"[{done}/{len(pending)}] {net} seed {seed}: "
                    + " ".join(f"{k} {v:.4f}" for k, v in metrics["auc"].items())
                    + f"  ({metrics['wall_seconds']:.0f} s, "
                    f"{metrics['samples_per_second']:.0f} req/s; "
                    f"{time.perf_counter() - started:.0f} s elapsed)",
                    flush=True,
                )
    return results


def _cost_rank(net: str) -> int:
    return COST_ORDER.index(net) if net in COST_ORDER else -1


def _store(
    results: dict[str, dict[int, dict[str, Any]]],
    nets: Sequence[str],
    run_net: str,
    seed: int,
    metrics: dict[str, Any],
) -> None:
    for net in nets:
        if SAME_RUNS.get(net, net) == run_net:
            results[net][seed] = metrics


# -- statistics and formatting --------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def auc_stats(runs: dict[int, dict[str, Any]], key: str = "auc") -> dict[str, tuple[float, float]]:
    return {name: mean_std([r[key][name] for r in runs.values()]) for name in OBJECTIVES}


def fmt(stat: tuple[float, float]) -> str:
    mean, std = stat
    return "—" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def auc_table(
    nets: Sequence[str],
    grid: dict[str, dict[int, dict[str, Any]]],
    oracle: bool,
    key: str = "auc",
) -> tuple[str, dict[str, Any]]:
    """Markdown AUC table (mean ± std over seeds) and the same numbers as data."""
    header = "| model | " + " | ".join(OBJECTIVES) + " |"
    lines = [header, "|" + "---|" * (len(OBJECTIVES) + 1)]
    data: dict[str, Any] = {}
    for net in nets:
        stats = auc_stats(grid[net], key)
        data[net] = {k: {"mean": m, "std": s} for k, (m, s) in stats.items()}
        lines.append(f"| {LABELS[net]} | " + " | ".join(fmt(stats[k]) for k in OBJECTIVES) + " |")
    if oracle:
        any_runs = next(iter(grid.values()))
        stats = auc_stats(any_runs, "oracle_auc")
        data["oracle"] = {k: {"mean": m, "std": s} for k, (m, s) in stats.items()}
        lines.append(
            "| oracle (true probabilities) | "
            + " | ".join(f"{stats[k][0]:.4f}" for k in OBJECTIVES)
            + " |"
        )
    return "\n".join(lines), data


def throughput_table(nets: Sequence[str], grid: dict[str, dict[int, dict[str, Any]]]) -> str:
    lines = [
        "| model | requests/s | candidates/s | model time per run (s) | parameters |",
        "|---|---|---|---|---|",
    ]
    for net in nets:
        runs = list(grid[net].values())
        rps = mean_std([r["samples_per_second"] for r in runs])
        cps = mean_std([r["candidates_per_second"] for r in runs])
        seconds = mean_std([r["model_seconds"] for r in runs])
        lines.append(
            f"| {LABELS[net]} | {rps[0]:.0f} ± {rps[1]:.0f} | {cps[0]:,.0f} | "
            f"{seconds[0]:.0f} | {runs[0]['n_parameters']:,} |"
        )
    return "\n".join(lines)


def paired_gap(
    grid: dict[str, dict[int, dict[str, Any]]], better: str, worse: str, objective: str
) -> dict[str, float]:
    """Per-seed difference better − worse (same seeds, same stream): mean, its std, and the
    larger of the two models' seed-to-seed stds (what "more than twice the std" compares to)."""
    seeds = sorted(set(grid[better]) & set(grid[worse]))
    gaps = [grid[better][s]["auc"][objective] - grid[worse][s]["auc"][objective] for s in seeds]
    mean, std = mean_std(gaps)
    seed_std = max(auc_stats(grid[better])[objective][1], auc_stats(grid[worse])[objective][1])
    return {
        "gap": mean,
        "gap_std": std,
        "seed_std": seed_std,
        "ratio": mean / seed_std if seed_std > 0 else math.inf,
    }


def ordering(
    nets: Sequence[str], grid: dict[str, dict[int, dict[str, Any]]], objective: str
) -> list[str]:
    """Networks from best to worst mean AUC on one objective."""
    return sorted(nets, key=lambda n: -auc_stats(grid[n])[objective][0])


def plot_auc_bars(
    nets: Sequence[str],
    grid: dict[str, dict[int, dict[str, Any]]],
    path: Path,
    title: str,
    oracle: bool,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(4 * len(OBJECTIVES), 3.6))
    for ax, objective in zip(axes, OBJECTIVES, strict=True):
        stats = [auc_stats(grid[n])[objective] for n in nets]
        means = [m for m, _ in stats]
        ax.bar(
            range(len(nets)),
            means,
            yerr=[s for _, s in stats],
            color=["#d95f02" if n == "ifa" else "#7570b3" for n in nets],
            capsize=3,
        )
        if oracle:
            value = auc_stats(next(iter(grid.values())), "oracle_auc")[objective][0]
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label="oracle")
            ax.legend(loc="upper left", fontsize=8)
        finite = [m for m in means if not math.isnan(m)]
        low = min(finite) if finite else 0.5
        ax.set_ylim(max(0.0, low - 0.05), 1.0 if oracle else max(finite, default=1.0) + 0.03)
        ax.set_xticks(range(len(nets)), [LABELS[n] for n in nets], rotation=45, ha="right")
        ax.set_title(objective)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- reports ------------------------------------------------------------------------------


@dataclass
class Report:
    name: str
    title: str
    sections: list[str]
    data: dict[str, Any]

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}.md").write_text(
            f"# {self.title}\n\n" + "\n\n".join(self.sections) + "\n"
        )
        (out / f"{self.name}.json").write_text(
            json.dumps(self.data, indent=2, default=_json_default, allow_nan=True) + "\n"
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def setup_text(world: Path, protocol: Protocol, seeds: Sequence[int], workers: int) -> str:
    import pyarrow.parquet as pq

    meta = json.loads((world / "world.json").read_text())
    requests = pq.read_table(world / "requests.parquet", columns=["history_start", "history_end"])
    lengths = np.asarray(requests.column("history_end")) - np.asarray(
        requests.column("history_start")
    )
    n_candidates = pq.read_metadata(world / "candidates.parquet").num_rows
    n_users = pq.read_metadata(world / "users.parquet").num_rows
    n_items = pq.read_metadata(world / "items.parquet").num_rows
    return (
        f"**Setup.** World `{world}` ({meta.get('preset', world.name)}, "
        f"seed {meta.get('seed', '—')}): {len(lengths)} requests, {n_candidates} candidates "
        f"({n_candidates / max(len(lengths), 1):.0f} per request), {n_users} users, {n_items} "
        f"items; a request's history (events before it) has median {np.median(lengths):.0f}, "
        f"mean {lengths.mean():.0f} and max {lengths.max()} events. "
        f"Streaming protocol (IFA §5.1): each batch is scored, then trained on (Adam); one pass "
        f"(epochs = {protocol.epochs}), batch {protocol.batch_size} requests, learning rate "
        f"{protocol.lr:g}, max_history = {protocol.max_history} most recent events (the same for "
        f"every model), shared network settings {dict(protocol.net_overrides) or 'default'} "
        f"(K = 50 and L = 50 for the sub-sequence models), the first {protocol.warmup:.0%} of "
        f"batches trained on but not evaluated (every model starts at random)"
        + (
            f"; before the stream, {protocol.burn_in} extra passes over that first half "
            f"(burn-in: more training on old requests, never on an evaluated one before it is "
            f"scored), so the evaluated second half meets models trained {protocol.burn_in + 1}× "
            f"as long. "
            if protocol.burn_in
            else ". "
        )
        + "AUC per objective over all candidates of the evaluated "
        "requests: impression scored by p_imp, each action by p_imp · p(action | imp). "
        f"Seeds {', '.join(map(str, seeds))} (model initialisation; the stream is the same); "
        f"mean ± sample std over seeds. Runs: {workers} worker process(es) × {protocol.threads} "
        f"thread on a 2-core machine shared with other work, so throughput numbers are "
        f"indicative (with 2 workers, each run shared the CPU with another run)."
    )


@dataclass(frozen=True)
class Trained:
    """The runs an experiment reports on, and where and how they were trained."""

    world: Path
    protocol: Protocol
    seeds: tuple[int, ...]
    workers: int
    grid: dict[str, dict[int, dict[str, Any]]]

    def setup(self) -> str:
        return setup_text(self.world, self.protocol, self.seeds, self.workers)

    def header(self, experiment: str) -> dict[str, Any]:
        """The JSON fields every report starts with."""
        return {
            "experiment": experiment,
            "world": str(self.world),
            "protocol": asdict(self.protocol),
            "seeds": list(self.seeds),
            "training_seconds": training_seconds(self.grid),
        }


def train_nets(options: Options, world: Path, base: Protocol, nets: Sequence[str]) -> Trained:
    """Every (net, seed) run of an experiment on ``world``, trained or taken from the cache."""
    protocol = options.protocol(base)
    grid = run_grid(options, world, nets, options.seeds, protocol, options.workers)
    return Trained(world, protocol, options.seeds, options.workers, grid)


def table2(options: Options) -> Report:
    trained = train_nets(options, options.synthetic_world(), SYNTHETIC, TABLE2_NETS)
    grid, out = trained.grid, options.out
    table, data = auc_table(TABLE2_NETS, grid, oracle=True)
    gaps = {o: paired_gap(grid, "ifa", "twin", o) for o in OBJECTIVES}
    must = all(gaps[o]["gap"] > 2 * gaps[o]["seed_std"] for o in ("impression", "click"))
    orders = {o: ordering(TABLE2_NETS, grid, o) for o in OBJECTIVES}
    plot_auc_bars(
        TABLE2_NETS,
        grid,
        out / f"table2{options.suffix}.png",
        f"Table 2: AUC on the {options.preset} world",
        True,
    )
    check = (
        "**IFA vs TWIN** (per-seed paired difference; criterion: mean gap > 2 × the larger "
        "seed-to-seed std of the two models):\n\n| objective | IFA − TWIN | paired std | "
        "seed std | gap / seed std |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {o} | {g['gap']:+.4f} | {g['gap_std']:.4f} | {g['seed_std']:.4f} | "
            f"{g['ratio']:.1f} |"
            for o, g in gaps.items()
        )
        + f"\n\nCriterion on impression and click: **{'met' if must else 'NOT met'}**."
    )
    ranking = "**Order by mean AUC** (best first):\n\n" + "\n".join(
        f"* {o}: " + " > ".join(LABELS[n] for n in orders[o]) for o in OBJECTIVES
    )
    return Report(
        f"table2{options.suffix}",
        f"Table 2 on the synthetic {options.preset} world",
        [
            trained.setup(),
            table,
            "**Second half of the stream only** (the same runs, requests after the midpoint):\n\n"
            + auc_table(TABLE2_NETS, grid, oracle=False, key="auc_second_half")[0],
            "**Training throughput** (requests and candidates per second of model time — forward, "
            "backward, update — mean over seeds):\n\n" + throughput_table(TABLE2_NETS, grid),
            check,
            ranking,
            interpret_table2(grid, gaps, orders, trained.protocol),
            world_statistics(trained.world, trained.protocol.max_history),
        ],
        {
            **trained.header("table2"),
            "auc": data,
            "ifa_vs_twin": gaps,
            "criterion_met": must,
            "order": orders,
            "throughput": _throughputs(TABLE2_NETS, grid),
            "runs": _runs_data(grid),
        },
    )


def table3(options: Options) -> Report:
    trained = train_nets(options, options.synthetic_world(), SYNTHETIC, TABLE3_NETS)
    grid, out = trained.grid, options.out
    table, data = auc_table(TABLE3_NETS, grid, oracle=True)
    steps = {
        "fsm": {o: paired_gap(grid, "ifa", "ifa_no_fsm", o) for o in OBJECTIVES},
        "ram": {o: paired_gap(grid, "ifa_no_fsm", "ifa_no_fsm_ram", o) for o in OBJECTIVES},
        "degree": {o: paired_gap(grid, "ifa", "ifa_no_degree", o) for o in OBJECTIVES},
    }
    in_order = {o: steps["fsm"][o]["gap"] > 0 and steps["ram"][o]["gap"] > 0 for o in OBJECTIVES}
    plot_auc_bars(
        TABLE3_NETS,
        grid,
        out / f"table3{options.suffix}.png",
        f"Table 3: ablations, {options.preset} world",
        True,
    )
    gap_lines = [
        "| objective | IFA − IFA-FSM (FSM) | IFA-FSM − IFA-FSM-RAM (RAM) | paper's order | "
        "IFA − IFA-degree (degree) |"
    ]
    gap_lines.append("|---|---|---|---|---|")
    for o in OBJECTIVES:
        f, r, d = steps["fsm"][o], steps["ram"][o], steps["degree"][o]
        gap_lines.append(
            f"| {o} | {f['gap']:+.4f} ({f['ratio']:.1f}× seed std) | "
            f"{r['gap']:+.4f} ({r['ratio']:.1f}× seed std) | {'yes' if in_order[o] else 'no'} | "
            f"{d['gap']:+.4f} ({d['ratio']:.1f}× seed std) |"
        )
    return Report(
        f"table3{options.suffix}",
        f"Table 3 (ablations) on the synthetic {options.preset} world",
        [
            trained.setup()
            + " IFA-FSM-RAM is TWIN (same class and config), so its runs are the TWIN runs of "
            "table2, as in the paper. IFA-degree is not in the paper: IFA whose towers get only "
            "the normalised read D⁻¹φ(Q)S of Eq. 6, without the degree φ(q)ᵀz.",
            table,
            "**Contribution of each component** (per-seed paired differences):\n\n"
            + "\n".join(gap_lines),
            interpret_table3(steps, in_order),
        ],
        {
            **trained.header("table3"),
            "auc": data,
            "steps": steps,
            "paper_order": in_order,
            "runs": _runs_data(grid),
        },
    )


def history_length(options: Options) -> Report:
    trained = train_nets(options, options.synthetic_world(), SYNTHETIC, HISTORY_NETS)
    grid, out = trained.grid, options.out
    first = next(iter(grid["ifa"].values()))
    buckets = [_bucket_label(b["lo"], b["hi"]) for b in first["auc_by_history"]]
    counts = [int(b["count"]) for b in first["auc_by_history"]]
    per_bucket: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for net in HISTORY_NETS:
        per_bucket[net] = {
            o: [
                mean_std([r["auc_by_history"][i][o] for r in grid[net].values()])
                for i in range(len(buckets))
            ]
            for o in OBJECTIVES
        }
    oracle = {o: [b[o] for b in first["oracle_by_history"]] for o in OBJECTIVES}
    gains = _bucket_gaps(grid, "ifa", "twin", len(buckets))
    fsm_gains = _bucket_gaps(grid, "ifa", "ifa_no_fsm", len(buckets))
    sections = [
        trained.setup()
        + " Buckets are the quintiles of request history length in the world (the length before "
        "max_history truncation); each bucket's AUC is over the candidates of its requests.",
    ]
    for o in ("impression", "click", "long_view", "like"):
        lines = [
            f"**{o}**\n",
            "| history length | candidates | "
            + " | ".join(LABELS[n] for n in HISTORY_NETS)
            + " | oracle | IFA − TWIN | IFA − IFA-FSM |",
            "|---|---|" + "---|" * (len(HISTORY_NETS) + 3),
        ]
        for i, label in enumerate(buckets):
            lines.append(
                f"| {label} | {counts[i]:,} | "
                + " | ".join(fmt(per_bucket[n][o][i]) for n in HISTORY_NETS)
                + f" | {oracle[o][i]:.4f} | {gains[o][i][0]:+.4f} ± {gains[o][i][1]:.4f} "
                f"| {fsm_gains[o][i][0]:+.4f} ± {fsm_gains[o][i][1]:.4f} |"
            )
        sections.append("\n".join(lines))
    sections.append(interpret_history(buckets, per_bucket, gains, fsm_gains, oracle))
    _plot_history(buckets, per_bucket, oracle, out / f"history_length{options.suffix}.png")
    return Report(
        f"history_length{options.suffix}",
        f"AUC against history length: IFA vs TWIN-style sampling ({options.preset} world)",
        sections,
        {
            **trained.header("history_length"),
            "buckets": buckets,
            "edges": first["history_edges"],
            "candidates": counts,
            "auc": {
                n: {o: [{"mean": m, "std": s} for m, s in v] for o, v in per_bucket[n].items()}
                for n in HISTORY_NETS
            },
            "oracle": oracle,
            "ifa_minus_twin": {o: [{"mean": m, "std": s} for m, s in v] for o, v in gains.items()},
            "ifa_minus_ifa_no_fsm": {
                o: [{"mean": m, "std": s} for m, s in v] for o, v in fsm_gains.items()
            },
        },
    )


def _bucket_gaps(
    grid: dict[str, dict[int, dict[str, Any]]], better: str, worse: str, n_buckets: int
) -> dict[str, list[tuple[float, float]]]:
    """Per bucket and objective, mean ± std over seeds of the paired AUC difference."""
    return {
        o: [
            mean_std(
                [
                    grid[better][s]["auc_by_history"][i][o] - grid[worse][s]["auc_by_history"][i][o]
                    for s in grid[better]
                ]
            )
            for i in range(n_buckets)
        ]
        for o in OBJECTIVES
    }


def _bucket_label(lo: float, hi: float) -> str:
    return f"[{lo:.0f}, {'∞' if math.isinf(hi) else f'{hi:.0f}'})"


def _plot_history(
    buckets: list[str],
    per_bucket: dict[str, dict[str, list[tuple[float, float]]]],
    oracle: dict[str, list[float]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(4 * len(OBJECTIVES), 3.6))
    x = np.arange(len(buckets))
    for ax, o in zip(axes, OBJECTIVES, strict=True):
        for net in HISTORY_NETS:
            means = [m for m, _ in per_bucket[net][o]]
            stds = [s for _, s in per_bucket[net][o]]
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=LABELS[net])
        ax.plot(x, oracle[o], "k--", linewidth=1, label="oracle")
        ax.set_xticks(x, buckets, rotation=30, ha="right", fontsize=8)
        ax.set_title(o)
        ax.set_xlabel("request history length")
    axes[0].set_ylabel("AUC")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def movielens(options: Options) -> Report:
    trained = train_nets(options, ensure_movielens(options.worlds), MOVIELENS, TABLE2_NETS)
    grid, out = trained.grid, options.out
    table, data = auc_table(TABLE2_NETS, grid, oracle=False)
    gaps = {o: paired_gap(grid, "ifa", "twin", o) for o in OBJECTIVES}
    orders = {o: ordering(TABLE2_NETS, grid, o) for o in OBJECTIVES}
    plot_auc_bars(
        TABLE2_NETS, grid, out / f"movielens{options.suffix}.png", "MovieLens 100K", False
    )
    world = trained.world
    meta = json.loads((world / "world.json").read_text())
    return Report(
        f"movielens{options.suffix}",
        "Table 2 models on MovieLens 100K",
        [
            trained.setup().replace(
                f"World `{world}` ({meta.get('preset', world.name)}",
                f"World `{world}` (MovieLens 100K",
            )
            + " MovieLens has no candidate sets or impressions: a request's candidates are the "
            "user's next rated films (impressed) plus unrated popular films (not impressed), and "
            "the actions are derived from ratings (see `model/movielens.py`). There is no ground "
            "truth, hence no oracle row.",
            table,
            "**Training throughput**:\n\n" + throughput_table(TABLE2_NETS, grid),
            "**Order by mean AUC** (best first):\n\n"
            + "\n".join(f"* {o}: " + " > ".join(LABELS[n] for n in orders[o]) for o in OBJECTIVES),
            interpret_movielens(grid, gaps, orders),
        ],
        {
            **trained.header("movielens"),
            "auc": data,
            "ifa_vs_twin": gaps,
            "order": orders,
            "throughput": _throughputs(TABLE2_NETS, grid),
            "runs": _runs_data(grid),
        },
    )


def training_seconds(grid: dict[str, dict[int, dict[str, Any]]]) -> dict[str, float]:
    """Wall time the (distinct) runs behind a report took to train, summed, and their count."""
    runs = {
        (SAME_RUNS.get(n, n), s): r["wall_seconds"] for n, rs in grid.items() for s, r in rs.items()
    }
    return {"runs": len(runs), "seconds": float(sum(runs.values()))}


def _throughputs(nets: Sequence[str], grid: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    return {
        n: {
            "requests_per_second": mean_std([r["samples_per_second"] for r in grid[n].values()]),
            "candidates_per_second": mean_std(
                [r["candidates_per_second"] for r in grid[n].values()]
            ),
        }
        for n in nets
    }


def _runs_data(grid: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    keep = ("auc", "oracle_auc", "samples_per_second", "candidates_per_second",
            "model_seconds", "wall_seconds", "n_requests", "n_eval_candidates", "n_parameters",
            "config")  # fmt: skip
    return {n: {s: {k: r[k] for k in keep} for s, r in runs.items()} for n, runs in grid.items()}


# -- interpretation written from the numbers ------------------------------------------------


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}pp"


def interpret_table2(
    grid: dict[str, dict[int, dict[str, Any]]],
    gaps: dict[str, dict[str, float]],
    orders: dict[str, list[str]],
    protocol: Protocol,
) -> str:
    stats = {n: auc_stats(grid[n]) for n in TABLE2_NETS}
    oracle = auc_stats(next(iter(grid.values())), "oracle_auc")
    best = {o: orders[o][0] for o in OBJECTIVES}
    lines = ["**Interpretation.**"]
    lines.append(
        "IFA − TWIN: "
        + ", ".join(f"{o} {_pp(g['gap'])} ({g['ratio']:.1f}× seed std)" for o, g in gaps.items())
        + ". Best model per objective: "
        + ", ".join(f"{o} {LABELS[best[o]]}" for o in OBJECTIVES)
        + "."
    )
    distance = {o: oracle[o][0] - max(stats[n][o][0] for n in TABLE2_NETS) for o in OBJECTIVES}
    lines.append(
        "Distance of the best model to the oracle: "
        + ", ".join(f"{o} {100 * d:.1f}pp" for o, d in distance.items())
        + (
            f". With one pass over {_n_requests(grid):,} requests every model is far from the "
            "ceiling: the table "
            "measures what each model learns from the same short stream (item embeddings start "
            "from scratch) more than what it could represent."
            if not protocol.burn_in
            else ". With burn-in the models are closer to the ceiling, so representation matters "
            "more and learning speed less than in the one-pass table."
        )
    )
    lines.extend(_mechanisms_table2(stats))
    return "\n\n".join(lines)


def _n_requests(grid: dict[str, dict[int, dict[str, Any]]]) -> int:
    """Requests in the stream the runs of ``grid`` were trained on."""
    return int(next(iter(next(iter(grid.values())).values()))["n_requests"])


def _mechanisms_table2(stats: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """Sentences about orderings that the world's mechanisms explain (chosen by outcome)."""
    out: list[str] = []
    click = {n: stats[n]["click"][0] for n in stats}
    imp = {n: stats[n]["impression"][0] for n in stats}
    learned = ("sim_soft", "twin", "ifa")
    if click["sim_hard"] > max(click[n] for n in learned):
        out.append(
            "On click, SIM_hard beats every model whose relevance is *learned* (SIM_soft, TWIN, "
            "IFA). Its "
            "GSU is a fixed rule on an observable field: from the first batch it hands the ESU "
            "exactly the candidate's category, which in this world carries most of the "
            "candidate's topics (P(topic | category) is a sparse Dirichlet, so a category holds "
            "few topics), and a category the user never touched (see the share below) gives "
            "an empty selection that reads as zeros, a clean 'never engaged' signal. TWIN's light "
            "attention, SIM_soft's embedding similarity and IFA's kernel all have to learn from "
            "randomly initialised id embeddings which events matter before they can select or "
            "weight them; their seed-to-seed std on click ("
            + ", ".join(f"{LABELS[n]} {100 * stats[n]['click'][1]:.2f}pp" for n in learned)
            + f", against {100 * stats['sim_hard']['click'][1]:.2f}pp for SIM_hard) shows how "
            "much their outcome depends on that learning. The world statistics below make the "
            "point: the latent same-topic count of the history alone ranks clicks about as well "
            "as the best model, the observable same-category count much worse; the topic is what "
            "matters, and only a learned model can find it, a category rule only approximates it."
        )
    elif click["sim_hard"] < click["twin"]:
        out.append(
            "SIM_hard trails TWIN on click: its GSU keeps only the candidate's category, while the "
            "world's topics cut across categories (the true relevance counts same-topic "
            "engagement in every category), so part of what matters is outside its sub-sequence."
        )
    near_avg = [
        n for n in ("din", "sim_soft", "twin", "ifa") if abs(click[n] - click["avgpool"]) < 0.01
    ]
    if len(near_avg) >= 3:
        out.append(
            ", ".join(LABELS[n] for n in near_avg)
            + " are within 1pp of AvgPooling on click, consistent with attention that is still "
            "close to uniform: each then reads roughly the mean of (a part of) the history, which "
            "is what AvgPooling reads."
        )
    if imp["ifa"] > imp["twin"] and imp["ifa"] - imp["twin"] > click["ifa"] - click["twin"]:
        out.append(
            "IFA's edge over TWIN is larger on impressions than on clicks: IFA has RAM and TWIN "
            "has not, and in this world the impression is decided by the logging policy "
            "comparing each candidate with the others in its set (Table 3 isolates RAM)."
        )
    if click["ifa"] > click["twin"]:
        out.append(
            "IFA reads every event against every candidate, and besides the normalised read "
            "D⁻¹φ(Q)S (a weighted *mean* of values, like TWIN's softmax over its top 50) it keeps "
            "the degree φ(q)ᵀz, the attention mass of the whole history on the candidate. With "
            "the relu kernel that mass is a count of the events the head finds related, in "
            "every category and beyond any K = 50; the world's relevance is exactly such a "
            "count (log1p of the topic engagement, against log1p of the total), and a softmax "
            "over a sub-sequence reports shares, never counts. Table 3's IFA-degree row "
            "measures how much of IFA's lead this is."
        )
    if click["ifa"] > max(click[n] for n in stats if n != "ifa"):
        out.append(
            "IFA is the best model on click: the cross-category topic engagement, the "
            "whole-history category mix and the counts beyond any K = 50 sub-sequence all "
            "reach its score."
        )
    elif click["twin"] >= click["ifa"]:
        out.append(
            "IFA does not beat TWIN on click: whatever the full sequence adds in this world "
            "(counts beyond K = 50, the category mix of the whole history) has not reached its "
            "score in one pass; Table 3's IFA-degree row shows how much the degree carries."
        )
    return out


def world_statistics(world: Path, max_history: int | None) -> str:
    """AUC of single history statistics on the second half of the stream: what the world's
    relevance is made of, and how much of it an observable rule can see."""
    from model.data import load_world
    from model.metrics import roc_auc

    w = load_world(world)
    items = w.items
    ev_item, _ = w.item_index(w.events["item_id"])
    cand_item, _ = w.item_index(w.candidates["item_id"])
    category, topic = items["category"], items["topic"]
    n = len(cand_item)
    same_category, same_topic, length = np.zeros(n), np.zeros(n), np.zeros(n)
    for r in range(w.n_requests // 2, w.n_requests):
        h, c = w.history_rows(r, max_history), w.candidate_rows(r)
        per_category = np.bincount(category[ev_item[h]], minlength=int(category.max()) + 1)
        per_topic = np.bincount(topic[ev_item[h]], minlength=int(topic.max()) + 1)
        same_category[c] = per_category[category[cand_item[c]]]
        same_topic[c] = per_topic[topic[cand_item[c]]]
        length[c] = h.stop - h.start
    late = np.zeros(n, dtype=bool)
    late[int(w.candidate_offsets[w.n_requests // 2]) :] = True
    rows = {
        "events of the candidate's category (observable; SIM_hard's rule)": same_category,
        "share of the history in that category": same_category / np.maximum(length, 1),
        "events of the candidate's topic (latent; must be learned)": same_topic,
        "share of the history in that topic": same_topic / np.maximum(length, 1),
    }
    lines = [
        "**What the world's relevance is made of** (AUC of one history statistic as the score, "
        "second half of the stream, same truncation to max_history):\n",
        "| statistic | impression | click |",
        "|---|---|---|",
    ]
    for name, score in rows.items():
        aucs = [roc_auc(w.candidates[f"y_{o}"][late], score[late]) for o in ("impression", "click")]
        lines.append(f"| {name} | {aucs[0]:.4f} | {aucs[1]:.4f} |")
    empty = float((same_category[late] == 0).mean())
    lines.append(f"\nCandidates with no event of their category in the history: {empty:.1%}.")
    return "\n".join(lines)


def interpret_table3(
    steps: dict[str, dict[str, dict[str, float]]], in_order: dict[str, bool]
) -> str:
    lines = ["**Interpretation.**"]
    fsm, ram, degree = steps["fsm"], steps["ram"], steps["degree"]
    lines.append(
        "Replacing FSM by TWIN's two-step attention changes AUC by "
        + ", ".join(f"{o} {_pp(-fsm[o]['gap'])}" for o in OBJECTIVES)
        + "; then removing RAM changes it by "
        + ", ".join(f"{o} {_pp(-ram[o]['gap'])}" for o in OBJECTIVES)
        + ". Dropping only IFA's degree feature changes it by "
        + ", ".join(f"{o} {_pp(-degree[o]['gap'])}" for o in OBJECTIVES)
        + "."
    )
    if all(in_order.values()):
        ram_largest_on_impressions = ram["impression"]["gap"] >= max(
            ram[o]["gap"] for o in OBJECTIVES
        )
        lines.append(
            "Every objective falls in the paper's order IFA > IFA-FSM > IFA-FSM-RAM. FSM is one "
            "step: the top-50 sub-sequence drops cross-category and profile signal and the "
            "counts that the full-sequence state keeps. RAM is the other"
            + (
                ", largest on impressions, which the world's logging policy decides by "
                "comparing a candidate with the others in its set."
                if ram_largest_on_impressions
                else "."
            )
        )
    else:
        lines.append(
            "The paper's order IFA > IFA-FSM > IFA-FSM-RAM does not hold for "
            + ", ".join(o for o, ok in in_order.items() if not ok)
            + "."
        )
        if all(ram[o]["gap"] > 0 for o in OBJECTIVES):
            lines.append(
                "RAM helps on every objective (IFA-FSM > IFA-FSM-RAM), as the paper finds and as "
                "the world's logging policy predicts: whether a candidate is shown depends on "
                "the other candidates, and the action labels are joint with the impression."
            )
        else:
            worst = max(abs(ram[o]["ratio"]) for o in OBJECTIVES if ram[o]["gap"] <= 0)
            lines.append(
                "RAM does not lift TWIN on "
                + ", ".join(o for o in OBJECTIVES if ram[o]["gap"] <= 0)
                + f" (IFA-FSM − IFA-FSM-RAM within {worst:.1f}× the seed std). The RAM variants "
                "tried, and the one that does lift TWIN here at a cost to IFA, are in "
                "results/design_sweeps.md."
            )
        if all(fsm[o]["gap"] > 0 for o in OBJECTIVES):
            lines.append("FSM's step (IFA > IFA-FSM) holds on every objective.")
        else:
            lines.append(
                "FSM does not help on every objective: TWIN's two-step attention is as good as "
                "or better than the full-sequence linear attention there."
            )
    if all(degree[o]["gap"] > 0 for o in OBJECTIVES):
        no_better = [o for o in OBJECTIVES if degree[o]["gap"] >= fsm[o]["gap"]]
        lines.append(
            (
                "Without its degree feature IFA is no better than IFA-FSM on "
                + ", ".join(no_better)
                + ": there the degree is all that FSM adds."
                if no_better
                else "Without its degree feature IFA is still above IFA-FSM on every "
                "objective: the degree is part of what FSM adds, not all of it."
            )
            + " IFA-degree reads the whole sequence too, but only through the normalised read "
            "D⁻¹φ(Q)S, a weighted mean of values: like TWIN's softmax over its top 50 it says "
            "where the user's attention mass lies, not how much of it there is. The degree "
            "φ(q)ᵀz is that amount; with the relu kernel, which is zero between items a head "
            "finds unrelated, it counts the related events of the whole history, and this "
            "world's relevance is such a count. A sub-sequence model cannot recover it: its "
            "softmax normalises the count away and its K caps it."
        )
    return "\n\n".join(lines)


def interpret_history(
    buckets: list[str],
    per_bucket: dict[str, dict[str, list[tuple[float, float]]]],
    gains: dict[str, list[tuple[float, float]]],
    fsm_gains: dict[str, list[tuple[float, float]]],
    oracle: dict[str, list[float]],
) -> str:
    def listed(values: dict[str, list[tuple[float, float]]], o: str) -> str:
        return ", ".join(_pp(g) for g, _ in values[o])

    fsm_click = [g for g, _ in fsm_gains["click"]]
    # "Grows" needs a steady rise, not one low first bucket: the gain must track the bucket order
    # and rise by more than half a point from the shortest to the longest histories.
    trend = float(np.corrcoef(np.arange(len(fsm_click)), fsm_click)[0, 1])
    grows = trend > 0.8 and fsm_click[-1] > fsm_click[0] + 0.005
    text = [
        "**Interpretation.**",
        f"IFA − TWIN by bucket, click: {listed(gains, 'click')}; impression: "
        f"{listed(gains, 'impression')}. TWIN lacks RAM, so this gap mixes both of IFA's parts; "
        f"IFA − IFA-FSM (both with RAM, full sequence against top-50 sampling) isolates FSM: "
        f"click {listed(fsm_gains, 'click')}; impression {listed(fsm_gains, 'impression')}.",
        (
            "FSM's contribution grows with the history, as the paper's argument predicts: a K = 50 "
            "sub-sequence holds a shrinking share of a long history, IFA's state sums all of it."
            if grows
            else "FSM's contribution does *not* grow with the history. On the shortest "
            "histories the top 50 holds (almost) the whole history, so both models see the same "
            "events and the gap there is not coverage: it is what the two reads report, TWIN's "
            "softmax a share of its events and IFA's degree a count. That part of the gap is "
            "there at every length; what a longer history adds on top of it (events beyond the "
            "top 50) does not widen the gap measurably here."
        ),
    ]
    models = {n: [m for m, _ in per_bucket[n]["click"]] for n in per_bucket}
    text.append(
        "Click AUC from the shortest to the longest bucket: "
        + ", ".join(f"{LABELS[n]} {v[0]:.4f} → {v[-1]:.4f}" for n, v in models.items())
        + f", oracle {oracle['click'][0]:.4f} → {oracle['click'][-1]:.4f}."
    )
    if all(v[-1] > v[0] + 0.005 for v in models.values()):
        text[-1] += (
            " Every model gains from a longer history (more evidence about the user's topics) "
            "while the ceiling stays about flat, so part of each model's gap to the oracle on "
            "short histories is simply missing evidence."
        )
    return "\n\n".join(text)


def interpret_movielens(
    grid: dict[str, dict[int, dict[str, Any]]],
    gaps: dict[str, dict[str, float]],
    orders: dict[str, list[str]],
) -> str:
    return "\n\n".join(
        [
            "**Interpretation.**",
            "IFA − TWIN: "
            + ", ".join(
                f"{o} {_pp(g['gap'])} ({g['ratio']:.1f}× seed std)" for o, g in gaps.items()
            )
            + ". Best per objective: "
            + ", ".join(f"{o} {LABELS[orders[o][0]]}" for o in OBJECTIVES)
            + ".",
            *(
                [
                    "DIN, which reads only the 50 most recent ratings, is best on click, most "
                    "likely because MovieLens users rate films in sessions: the next rated films "
                    "(the impressed candidates) resemble the last few ratings more than the whole "
                    "history."
                ]
                if orders["click"][0] == "din"
                else []
            ),
            "MovieLens histories are short (a few hundred ratings at most) and the impression "
            "label here separates the user's next rated films from unrated popular ones, which "
            "is mostly a question of the user's taste profile and of recency; the synthetic "
            "world's built-in mechanisms (relevance outside the candidate's category, "
            "impressions decided against the other candidates) are not in this data.",
            (
                "IFA still leads on impression and click. The one mechanism that carries over is "
                "the count: how many of a user's ratings are related to a candidate (same genre, "
                "same release year) is real information in any history, IFA's degree reads "
                "it, and a softmax over a sub-sequence, normalised to shares, cannot."
                if orders["impression"][0] == "ifa" and orders["click"][0] == "ifa"
                else "Small or reversed gaps are therefore no surprise; they are reported as "
                "measured."
            ),
        ]
    )


# -- command line -------------------------------------------------------------------------


EXPERIMENTS: dict[str, Callable[[Options], Report]] = {
    "table2": table2,
    "table3": table3,
    "history_length": history_length,
    "movielens": movielens,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.experiment", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=2, help="training processes at once")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--preset", default="medium", help="synthetic world preset")
    parser.add_argument("--runs", type=Path, default=RUNS, help="run cache directory")
    parser.add_argument(
        "--burn-in",
        type=int,
        default=0,
        help="extra passes over the first half before evaluating the second half",
    )
    args = parser.parse_args(argv)
    options = Options(
        tuple(args.seeds), args.workers, args.out, args.preset, WORLDS, args.runs, args.burn_in
    )
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report = EXPERIMENTS[args.name](options)
    elapsed = time.perf_counter() - started
    report.data["wall_seconds"] = elapsed
    report.sections.append(
        f"*Generated by `python -m model.experiment {' '.join(argv or sys.argv[1:])}` "
        f"in {elapsed:.0f} s (cached runs are reused, not retrained). The "
        f"{report.data['training_seconds']['runs']} runs behind it took "
        f"{report.data['training_seconds']['seconds']:.0f} s of training wall time in all, "
        f"{options.workers} at a time.*"
    )
    report.write(args.out)
    print("\n\n".join(report.sections[1:3]))
    print(f"wrote {args.out / report.name}.md, .json, .png in {elapsed:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
