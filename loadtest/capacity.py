"""Capacity curve of one service process: latency vs offered load, state cache on and off.

    python -m loadtest.capacity [--model-dir artifacts] [--users 200] [--events-per-user 10000]

On this machine, bounded in time, all traffic to 127.0.0.1:

1. a world of ``--users`` users with exactly ``--events-per-user`` events each over the model's
   catalogue is written and seeded (``IFA_SEED_WORLD``) into a private ``redis-server``;
2. ``python -m service`` (one uvicorn worker, Redis store) starts; every user is ranked once so
   that the state cache is warm;
3. Locust offers increasing constant-throughput load (``--rates`` requests/s, a 4:1 /rank:/events
   mix, ``--candidates`` per /rank) for ``--step-seconds`` each, until p99 passes the budget (or
   a request fails) on ``--max-failing-steps`` consecutive steps;
4. the same with the state cache disabled, so that every /rank encodes the whole history.

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (default ``results/capacity``); per-step
Locust CSVs go to ``runs/capacity/``. Locust runs as a subprocess (:mod:`loadtest.runner`).

"Cache off" is the service's ``IFA_STATE_CACHE=off``: every /rank encodes the user's whole log.
The measured miss share is reported beside each step, so the mode is verified, not assumed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families

from loadtest.harness import (
    REPO_ROOT,
    LiveService,
    redis_server,
    running_service,
    warm_state_cache,
    write_world,
)
from loadtest.runner import LoadOptions, check, run_locust
from loadtest.traffic import TrafficConfig

BUDGET_MS = 50.0
DEFAULT_RATES = (2, 5, 10, 20, 30, 45, 60, 80, 100, 130, 160, 200)
CACHE_MODES = ("on", "off")
USER_RPS = 2.0
"""Tasks/s of one Locust user: offered load = users × USER_RPS, so many users keep each one's
slack (500 ms) far above any latency that matters."""
REDIS_PREFIX = "ifa"


# -- server-side view: /metrics deltas over a step ------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(metric sample name, sorted labels) -> value, as scraped from /metrics."""


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


Labels = tuple[tuple[str, str], ...]


def delta(before: Samples, after: Samples, name: str, **labels: str) -> dict[Labels, float]:
    """Increase of every sample of ``name`` whose labels include ``labels``, keyed by labels."""
    wanted = set(labels.items())
    return {
        key[1]: value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == name and wanted <= set(key[1])
    }


def bucket_quantile(q: float, buckets: dict[float, float]) -> float:
    """``histogram_quantile``: linear interpolation inside the bucket holding rank q·count."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class ServerView:
    rank_p50_ms: float
    rank_p99_ms: float
    cache_outcomes: dict[str, int]
    stage_mean_ms: dict[str, float]
    """Mean ms per /rank in each stage; model stages include the wait for the model thread."""
    cpu_percent: float
    """CPU the service process used over the step (100 = one core)."""
    cpu_ms_per_request: float
    runqueue_ms_per_request: float
    """Time the service's threads were ready to run but waited for a CPU, per request."""

    @classmethod
    def between(
        cls,
        before: Samples,
        after: Samples,
        cpu_seconds: float,
        runqueue_seconds: float,
        wall_seconds: float,
    ) -> ServerView:
        buckets = {
            float(dict(labels)["le"]): value
            for labels, value in delta(
                before, after, "ifa_http_request_duration_seconds_bucket", route="/rank"
            ).items()
        }
        outcomes = {
            dict(labels)["outcome"]: int(value)
            for labels, value in delta(before, after, "ifa_state_cache_total").items()
        }
        sums = delta(before, after, "ifa_rank_stage_duration_seconds_sum")
        ranks = sum(outcomes.values())
        stages = {
            dict(labels)["stage"]: 1000 * value / ranks if ranks else math.nan
            for labels, value in sums.items()
        }
        served = sum(
            value
            for labels, value in delta(before, after, "ifa_http_requests_total").items()
            if dict(labels)["route"] != "/metrics"
        )
        return cls(
            rank_p50_ms=1000 * bucket_quantile(0.50, buckets),
            rank_p99_ms=1000 * bucket_quantile(0.99, buckets),
            cache_outcomes=outcomes,
            stage_mean_ms=stages,
            cpu_percent=100 * cpu_seconds / wall_seconds,
            cpu_ms_per_request=1000 * cpu_seconds / served if served else math.nan,
            runqueue_ms_per_request=1000 * runqueue_seconds / served if served else math.nan,
        )


def scheduler_seconds(pid: int) -> tuple[float, float]:
    """(on-CPU, waiting-to-run) seconds of all threads of a process so far (Linux schedstat).

    Waiting-to-run is time a thread was runnable but other processes had the CPUs: on a shared
    machine it, not the service's own work, is what stretches the tail.
    """
    on_cpu = waiting = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        fields = stat.read_text().split()
        on_cpu, waiting = on_cpu + int(fields[0]), waiting + int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


# -- one step, one curve ----------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    offered_rps: float
    users: int
    achieved_rps: float
    rank_rps: float
    rank_p50_ms: float
    rank_p95_ms: float
    rank_p99_ms: float
    events_p99_ms: float
    failures: int
    requests: int
    passed: bool
    violations: list[str]
    server: ServerView
    load_average: float
    """1-minute load average at the end of the step (the machine is shared)."""


def run_step(
    service: LiveService, rate: float, seconds: int, traffic: TrafficConfig, prefix: Path
) -> Step:
    users = max(1, math.ceil(rate / USER_RPS))
    options = LoadOptions(
        host=service.url,
        users=users,
        spawn_rate=users,
        run_time_s=seconds,
        csv_prefix=prefix,
        traffic=replace(traffic, user_rps=rate / users),
        reset_stats=True,
    )
    pid = service.process.pid
    before, (cpu_before, wait_before) = scrape(service.url), scheduler_seconds(pid)
    wall_before = time.monotonic()
    summary = check(run_locust(options), BUDGET_MS, 0.0)
    after, (cpu_after, wait_after) = scrape(service.url), scheduler_seconds(pid)
    wall_after = time.monotonic()
    groups = {g.name: g for g in summary.groups}
    rank, events = groups.get("/rank"), groups.get("/events")
    return Step(
        offered_rps=rate,
        users=users,
        achieved_rps=summary.aggregated.requests_per_s,
        rank_rps=rank.requests_per_s if rank else 0.0,
        rank_p50_ms=rank.p50_ms if rank else math.nan,
        rank_p95_ms=rank.p95_ms if rank else math.nan,
        rank_p99_ms=rank.p99_ms if rank else math.nan,
        events_p99_ms=events.p99_ms if events else math.nan,
        failures=summary.aggregated.failures,
        requests=summary.aggregated.requests,
        passed=summary.passed,
        violations=summary.violations,
        server=ServerView.between(
            before,
            after,
            cpu_seconds=cpu_after - cpu_before,
            runqueue_seconds=wait_after - wait_before,
            wall_seconds=wall_after - wall_before,
        ),
        load_average=os.getloadavg()[0],
    )


@dataclass(frozen=True)
class Curve:
    mode: str
    steps: list[Step]

    @property
    def capacity(self) -> Step | None:
        """The passing step (p99 within budget, no failure) with the highest throughput."""
        passing = [s for s in self.steps if s.passed]
        return max(passing, key=lambda s: s.achieved_rps) if passing else None


def run_curve(
    mode: str,
    service: LiveService,
    rates: Sequence[float],
    seconds: int,
    traffic: TrafficConfig,
    csv_dir: Path,
    max_failing_steps: int,
) -> Curve:
    steps: list[Step] = []
    failing = 0
    for rate in rates:
        step = run_step(service, rate, seconds, traffic, csv_dir / f"{mode}-{rate:g}rps")
        steps.append(step)
        outcomes = step.server.cache_outcomes
        print(
            f"[{mode}] offered {rate:6.1f}/s achieved {step.achieved_rps:6.1f}/s  /rank p50 "
            f"{step.rank_p50_ms:5.0f} p99 {step.rank_p99_ms:5.0f} ms  failures {step.failures}  "
            f"cache {outcomes}  service CPU {step.server.cpu_percent:.0f} % "
            f"({step.server.cpu_ms_per_request:.1f} ms/request, waited "
            f"{step.server.runqueue_ms_per_request:.1f} ms for a CPU)  "
            f"load {step.load_average:.1f}",
            flush=True,
        )
        failing = 0 if step.passed else failing + 1
        if failing >= max_failing_steps:
            break
    return Curve(mode, steps)


# -- the state cache switch -------------------------------------------------------------------


def cache_settings(mode: str) -> dict[str, str]:
    """Extra service settings for state cache ``mode`` (on, off)."""
    return {"IFA_STATE_CACHE": "off" if mode == "off" else "on"}


# -- the report -------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


STEP_COLUMNS = (
    "offered req/s", "users", "achieved req/s", "/rank/s", "/rank p50 ms", "/rank p95 ms",
    "/rank p99 ms", "/events p99 ms", "server /rank p99 ms", "failures",
    "cache hit/stale/miss", "mean encode ms", "mean forward ms", "service CPU %",
    "service CPU ms/request", "runqueue wait ms/request", "load avg", "within budget",
)  # fmt: skip


def table_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def step_cells(s: Step) -> list[object]:
    outcomes, stages = s.server.cache_outcomes, s.server.stage_mean_ms
    return [
        f"{s.offered_rps:g}", s.users, f"{s.achieved_rps:.1f}", f"{s.rank_rps:.1f}",
        f"{s.rank_p50_ms:g}", f"{s.rank_p95_ms:g}", f"{s.rank_p99_ms:g}", f"{s.events_p99_ms:g}",
        f"{s.server.rank_p99_ms:.1f}", s.failures,
        "/".join(str(outcomes.get(o, 0)) for o in ("hit", "stale", "miss")),
        f"{stages.get('encode', math.nan):.2f}", f"{stages.get('forward', math.nan):.2f}",
        f"{s.server.cpu_percent:.0f}", f"{s.server.cpu_ms_per_request:.1f}",
        f"{s.server.runqueue_ms_per_request:.1f}",
        f"{s.load_average:.1f}", "yes" if s.passed else "no: " + "; ".join(s.violations),
    ]  # fmt: skip


def describe_machine(facts: object) -> str:
    assert isinstance(facts, dict)
    return (
        f"{facts['cpus']} CPUs ({facts['processor']}), Python {facts['python']}, torch "
        f"{facts['torch']}, 1-minute load average {facts['load_average_at_start']:.1f} at start"
    )


def to_markdown(report: dict[str, object], curves: list[Curve]) -> str:
    setup = report["setup"]
    assert isinstance(setup, dict)
    lines = [
        "# Capacity of one service process",
        "",
        f"Generated by `python -m loadtest.capacity` on {report['date']}. Model "
        f"`{setup['model_version']}`; {setup['users']} users with {setup['events_per_user']:,} "
        f"events each (seeded into Redis); {setup['candidates']:,} candidates per /rank, k = 50; "
        f"/rank:/events = 4:1; one uvicorn worker, {setup['torch_threads']} torch thread; "
        f"Redis store on a private redis-server; Locust (Poisson arrivals, "
        f"{USER_RPS:g} tasks/s per user) on the same machine, {setup['step_seconds']} s per step "
        f"after spawning. Machine: {describe_machine(report['machine'])}.",
        "",
        "Latencies are client-side (Locust, integer ms; p99 of each step's requests); the "
        "server-side /rank p99 is interpolated from the service's own histogram. The machine is "
        "shared (see the load average column): read the numbers as an order of magnitude for "
        "this box, not as a benchmark.",
        "",
        "A step passes when the p99 of /rank and of /events are within "
        f"{BUDGET_MS:g} ms and no request failed; a curve stops after "
        f"{setup['max_failing_steps']} failing steps in a row. Capacity is the highest "
        "throughput of a passing step. The CPU ceiling is what one core would serve at the "
        "service's measured CPU time per request of the mix (median over the steps), "
        "queueing aside.",
        "",
        "| state cache | capacity, req/s (all routes) | of which /rank/s | /rank p99 there "
        "| service CPU ms/request | CPU ceiling, req/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for curve in curves:
        best = curve.capacity
        cpu_ms = statistics.median(s.server.cpu_ms_per_request for s in curve.steps)
        ceiling = f"{cpu_ms:.1f} | {1000 / cpu_ms:.0f}"
        if best is None:
            lines.append(f"| {curve.mode} | none passed | | | {ceiling} |")
        else:
            lines.append(
                f"| {curve.mode} | {best.achieved_rps:.1f} | {best.rank_rps:.1f} "
                f"| {best.rank_p99_ms:g} ms | {ceiling} |"
            )
    for curve in curves:
        lines += [
            "",
            f"## State cache {curve.mode}",
            "",
            table_row(STEP_COLUMNS),
            "|" + "---:|" * (len(STEP_COLUMNS) - 1) + "---|",
        ]
        lines += [table_row(step_cells(s)) for s in curve.steps]
    lines += ["", f"![latency vs throughput]({report['plot']})", ""]
    return "\n".join(lines)


def plot(curves: list[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for curve, colour in zip(curves, ("tab:blue", "tab:red"), strict=False):
        x = [s.achieved_rps for s in curve.steps]
        axis.plot(x, [s.rank_p99_ms for s in curve.steps], "o-", color=colour,
                  label=f"cache {curve.mode}: /rank p99")  # fmt: skip
        axis.plot(x, [s.rank_p50_ms for s in curve.steps], "s--", color=colour, alpha=0.6,
                  label=f"cache {curve.mode}: /rank p50")  # fmt: skip
    axis.axhline(BUDGET_MS, color="black", linestyle=":", label=f"{BUDGET_MS:g} ms budget")
    axis.set_xlabel("achieved throughput (requests/s, /rank + /events)")
    axis.set_ylabel("latency (ms, client side)")
    axis.set_yscale("log")
    axis.set_title("One service process: latency vs throughput")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def finite(value: object) -> object:
    """JSON has no NaN: nested NaNs become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


# -- main -------------------------------------------------------------------------------------


def ensure_model(model_dir: Path) -> None:
    """Build the demo model the README uses where the directory has none."""
    if (model_dir / "LATEST").is_file():
        return
    print(f"no {model_dir}/LATEST: building the demo model", flush=True)
    subprocess.run(
        [sys.executable, "-m", "model.demo", "--out", str(model_dir)], cwd=REPO_ROOT, check=True
    )


def catalogue_item_ids(model_dir: Path) -> tuple[str, np.ndarray]:
    from model.artifact import load_manifest, resolve_artifact_dir

    manifest = load_manifest(model_dir)
    path = resolve_artifact_dir(model_dir) / manifest.catalogue_file
    ids = pq.read_table(path, columns=["item_id"]).column("item_id").to_numpy()
    return manifest.version, np.asarray(ids, dtype=np.int64)


def parse_modes(text: str) -> list[str]:
    modes = text.split(",")
    if not set(modes) <= set(CACHE_MODES):
        raise argparse.ArgumentTypeError(f"modes are a comma-separated subset of {CACHE_MODES}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--out", type=Path, default=Path("results/capacity"),
                        help="writes <out>.md, <out>.json, <out>.png")  # fmt: skip
    parser.add_argument("--csv-dir", type=Path, default=Path("runs/capacity"))
    parser.add_argument("--users", type=int, default=200, help="users in the load world")
    parser.add_argument("--events-per-user", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--step-seconds", type=int, default=30)
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=list(DEFAULT_RATES),
        help="offered requests/s, comma-separated",
    )
    parser.add_argument(
        "--max-failing-steps",
        type=int,
        default=3,
        help="stop a curve after this many consecutive steps over budget",
    )
    parser.add_argument(
        "--modes", type=parse_modes, default=list(CACHE_MODES), help="state cache modes: on,off"
    )
    parser.add_argument("--torch-threads", type=int, default=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    ensure_model(args.model_dir)
    version, item_ids = catalogue_item_ids(args.model_dir)
    work = args.csv_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    world = write_world(work / "world", item_ids, args.users, args.events_per_user)
    traffic = TrafficConfig(world=world, candidates=args.candidates)
    warm_candidates = item_ids[: args.candidates].tolist()

    curves: list[Curve] = []
    with redis_server(work) as redis_url:
        env = {
            "IFA_STORE": "redis",
            "IFA_REDIS_URL": redis_url,
            "IFA_REDIS_PREFIX": REDIS_PREFIX,
            "IFA_SEED_WORLD": str(world),
            "IFA_TORCH_THREADS": str(args.torch_threads),
        }
        for mode in args.modes:
            log = work / f"service-cache-{mode}.log"
            with running_service(args.model_dir, log, env | cache_settings(mode)) as service:
                if mode == "on":
                    print(f"[{mode}] warming the state cache of {args.users} users", flush=True)
                    warm_state_cache(service.url, range(args.users), warm_candidates)
                curve = run_curve(
                    mode, service, args.rates, args.step_seconds, traffic, work,
                    args.max_failing_steps,
                )  # fmt: skip
                curves.append(curve)

    out = args.out
    report: dict[str, object] = {
        "plot": f"{out.name}.png",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": round(time.time() - started),
        "machine": machine(),
        "setup": {
            "model_version": version,
            "users": args.users,
            "events_per_user": args.events_per_user,
            "candidates": args.candidates,
            "step_seconds": args.step_seconds,
            "torch_threads": args.torch_threads,
            "budget_ms": BUDGET_MS,
            "max_failing_steps": args.max_failing_steps,
            "cache_off_by": "IFA_STATE_CACHE=off",
        },
        "curves": [
            {
                "mode": c.mode,
                "capacity_rps": c.capacity.achieved_rps if c.capacity else None,
                "capacity_rank_rps": c.capacity.rank_rps if c.capacity else None,
                "steps": [asdict(s) for s in c.steps],
            }
            for c in curves
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(finite(report), indent=2) + "\n")
    Path(f"{out}.md").write_text(to_markdown(report, curves))
    plot(curves, Path(f"{out}.png"))
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
