"""What every experiment shares: protocols, worlds, the run cache and pool, statistics, reports.

Worlds are generated if missing and cached under ``data/worlds/<preset>-<seed>/``; runs are cached
under ``runs/experiments/<world>/<protocol>/<net>-seed<k>/``, so an experiment re-run (or another
experiment needing the same runs) trains nothing twice. Runs go through a pool of worker
processes, one thread each: on a small shared machine, processes keep the cores busier than
intra-op threads of one process.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.data import world_fingerprint
from model.features import DEFAULT_MAX_HISTORY, OBJECTIVES
from model.nets import net_config
from model.train import TrainSettings, train
from model.world import Preset

RESULTS = Path("results")
WORLDS = Path("data/worlds")
RUNS = Path("runs/experiments")
SEEDS: tuple[int, ...] = (0, 1, 2)

TABLE2_NETS: tuple[str, ...] = (
    "avgpool", "din", "din_softmax", "sim_hard", "sim_soft", "twin", "ifa_no_degree", "ifa"
)  # fmt: skip
"""DIN in its published form and the softmax variant; IFA as the paper defines it (no degree)
and with the degree feature, as separate rows."""
TABLE3_NETS: tuple[str, ...] = ("ifa", "ifa_no_fsm", "ifa_no_fsm_ram", "ifa_no_degree")
"""The paper's three rows, then IFA without its degree feature (our addition)."""
HISTORY_NETS: tuple[str, ...] = ("ifa", "ifa_no_fsm", "twin", "sim_hard")
SAME_RUNS = {"ifa_no_fsm_ram": "twin"}
"""Registry aliases with identical class and config: their runs are shared, not repeated."""
LABELS = {
    "avgpool": "AvgPooling",
    "din": "DIN (paper)",
    "din_softmax": "DIN-softmax",
    "sim_hard": "SIM_hard",
    "sim_soft": "SIM_soft",
    "twin": "TWIN",
    "ifa": "IFA+degree",
    "ifa_no_fsm": "IFA-FSM",
    "ifa_no_fsm_ram": "IFA-FSM-RAM",
    "ifa_no_degree": "IFA (paper)",
}
# Cheapest last, so that two workers finish together.
COST_ORDER = (
    "sim_soft", "sim_hard", "ifa_no_fsm", "twin", "ifa", "ifa_no_degree", "din", "din_softmax",
    "avgpool",
)  # fmt: skip


@dataclass(frozen=True)
class Protocol:
    """Training settings shared by every model of an experiment (only the network differs)."""

    batch_size: int = 16
    lr: float = 1e-2
    epochs: int = 1
    max_history: int | None = DEFAULT_MAX_HISTORY
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
    cached_only: bool = False
    """Report on the runs already in the cache and train none (the report lists what ran)."""
    presets: tuple[str, ...] = ()
    """World presets of a multi-world study (empty: the study's own list)."""
    nets: tuple[str, ...] = ()
    """Networks of the study (empty: the study's own list)."""
    unit_users: int | None = None
    """Learning curve and cross-category worlds: users of one unit of data (1×), whose
    requests are the study's request count (None: the base preset's users)."""
    cross_units: int | None = None
    """Cross-category worlds: their size in units; the last unit is evaluated (None: the
    study's default)."""
    world: Path | None = None
    """A world directory of one's own (``python -m model.prepare``) to run the study on instead
    of generated worlds (the fair study)."""

    @property
    def suffix(self) -> str:
        return f"_burnin{self.burn_in}" if self.burn_in else ""

    def synthetic_world(self) -> Path:
        """The preset's world of seed 0, generated first if missing."""
        return ensure_world(self.preset, 0, self.worlds)

    def protocol(self, base: Protocol) -> Protocol:
        return replace(base, warmup=0.5, burn_in=self.burn_in) if self.burn_in else base


SYNTHETIC = Protocol()
MOVIELENS = Protocol()
"""The same 1,000-event window as everywhere (MovieLens histories are shorter than it)."""


# -- worlds and runs ----------------------------------------------------------------------


def ensure_world(preset: str | Preset, seed: int, root: Path = WORLDS) -> Path:
    """``root/<name>-<seed>``, generated first if missing or generated from another config of
    the preset than today's (built aside, then renamed over it)."""
    from model.world import resolve_preset, write_world

    resolved = resolve_preset(preset)
    name = resolved.name
    path = root / f"{name}-{seed}"
    wanted = json.loads(json.dumps(asdict(resolved)))
    meta = path / "world.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("preset_config") != wanted:
        staging = root / f".{name}-{seed}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        print(f"generating world {name} (seed {seed}) into {path}", flush=True)
        write_world(resolved, seed, staging)
        shutil.rmtree(path, ignore_errors=True)
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


def cached_run(out: Path, settings: TrainSettings, world: Path) -> dict[str, Any] | None:
    """The metrics of the run cached in ``out`` if it was trained with ``settings`` on the world
    now at ``world``: the run must record the fingerprint of that world's files (a run without
    one, or with another, was trained on an earlier world generated at that path), and be no
    older than its ``world.json``."""
    path = out / "metrics.json"
    if not path.is_file() or path.stat().st_mtime < (world / "world.json").stat().st_mtime:
        return None
    metrics: dict[str, Any] = json.loads(path.read_text())
    if metrics.get("world_fingerprint") != world_fingerprint(world):
        return None
    return metrics if _matches(metrics, settings) else None


def run_dir(options: Options, world: Path, protocol: Protocol, net: str, seed: int) -> Path:
    """Where the run of ``net`` with ``seed`` on ``world`` under ``protocol`` is cached."""
    return options.runs / world.name / protocol.tag / f"{SAME_RUNS.get(net, net)}-seed{seed}"


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
            out = run_dir(options, world, protocol, net, seed)
            settings = protocol.settings(world, net, seed, out)
            cached = cached_run(out, settings, world)
            if cached is not None:
                _store(results, nets, net, seed, cached)
            elif not options.cached_only:
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


def training_seconds(grid: dict[str, dict[int, dict[str, Any]]]) -> dict[str, float]:
    """Wall time the (distinct) runs behind a report took to train, summed, and their count."""
    runs = {
        (SAME_RUNS.get(n, n), s): r["wall_seconds"] for n, rs in grid.items() for s, r in rs.items()
    }
    return {"runs": len(runs), "seconds": float(sum(runs.values()))}


def throughputs(nets: Sequence[str], grid: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    return {
        n: {
            "requests_per_second": mean_std([r["samples_per_second"] for r in grid[n].values()]),
            "candidates_per_second": mean_std(
                [r["candidates_per_second"] for r in grid[n].values()]
            ),
        }
        for n in nets
    }


def runs_data(grid: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    keep = ("auc", "oracle_auc", "samples_per_second", "candidates_per_second",
            "model_seconds", "wall_seconds", "n_requests", "n_eval_candidates", "n_parameters",
            "config")  # fmt: skip
    return {n: {s: {k: r[k] for k in keep} for s, r in runs.items()} for n, runs in grid.items()}


def pp(x: float) -> str:
    return f"{100 * x:+.2f}pp"
