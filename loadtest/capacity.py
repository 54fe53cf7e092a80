"""Capacity of the service: latency against offered load, measured open-loop, per configuration.

    python -m loadtest.capacity [--model-dir artifacts] [--configs baseline,defaults]
        [--users 100] [--events-per-user 10000] [--step-seconds 20] [--no-locust]
        [--outside-share 0.2] [--baseline REV] [--repeats 1]

On this machine, bounded in time, all traffic to 127.0.0.1:

1. a world of ``--users`` users with exactly ``--events-per-user`` events each over the model's
   catalogue is written, and a private ``redis-server`` started;
2. for each curve, a configuration (:data:`CONFIGS`: today's single worker, the new defaults,
   ...) on this tree or, with ``--baseline REV``, on a checkout of revision REV (``CONFIG@REV``,
   same venv, model, world and Redis): the Redis server is flushed, ``python -m service`` starts
   on it with its arrival log on and seeds the world (``IFA_SEED_WORLD``), the live-catalogue
   pool is registered with ``PUT /items``, and every user is ranked once with the load's
   candidate mix so that the state and item caches are warm;
3. after an unrecorded 5 s step, each step offers one rate of a 4:1 /rank:/events mix
   (``--candidates`` per /rank, ``--outside-share`` of them outside the model's catalogue: half
   live-catalogue items, half ids nobody knows, from recurring pools) with the schedule-driven
   generator of :mod:`loadtest.openloop`: Poisson arrival times fixed in
   advance, latency from the intended send (wrk2's rule). The service's arrival log checks that
   what arrived was what was offered (the most arrivals in 20 ms against a Poisson stream's), and
   the generator's own lag and CPU share say whether it, not the service, was the limit;
4. once the curve's open-loop steps are done, each of its rates is offered again by
   Locust (``loadtest/locustfile.py`` as shipped), so the table shows what a Locust user would
   conclude from the same step; its arrivals are checked too.

``--repeats N`` runs N rounds of every curve, a configuration's curves on both trees back to
back and the tree that goes first alternating, so that both see the same machine. A step passes
when /rank and /events p99 are within the budget and nothing failed; a curve's capacity is its
highest passing offered rate; the report gives each round's, their median and, per
configuration, this tree's capacity over the baseline revision's. Writes ``<out>.md``,
``<out>.json`` and ``<out>.png`` (default ``results/capacity``); per-step Locust CSVs and the
service logs go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import redis
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cpu_probe import busy_cpu_shares
from loadtest.harness import (
    REPO_ROOT,
    LiveService,
    checkout,
    put_items,
    redis_server,
    running_service,
    warm_state_cache,
    write_world,
)
from loadtest.openloop import (
    ArrivalCheck,
    PreparedRequest,
    RunResult,
    check_arrivals,
    poisson_schedule,
    prepare_post,
    read_arrivals,
    run_open_loop,
)
from loadtest.runner import LoadOptions, check, run_locust
from loadtest.traffic import Traffic, TrafficConfig, load_ids

BUDGET_MS = 50.0
REDIS_PREFIX = "ifa"
LOCUST_USER_RPS = 2.0
"""Tasks/s of one Locust user: offered load = users × this, so each user's slack (500 ms) stays
far above any latency that matters."""
WARMUP_STEP_SECONDS = 5.0
"""An unrecorded open-loop step at a configuration's first rate, before its curve."""
SETTLE_SECONDS = 2.0
"""Pause after each step, so the service has drained before the next one starts."""
GENERATOR_LAG_LIMIT_MS = 5.0
"""A step whose generator sent its p99 request later than this was limited by the generator."""
GENERATOR_CPU_LIMIT = 0.8
"""... or whose generator kept a core this busy."""
LIVE_POOL = 2000
"""Live-catalogue items registered before each curve (``PUT /items``): with a fifth of 1,000
candidates outside the catalogue, half of them live, each recurs about 12 times a second at
300 req/s, as the new items of a feed do."""
UNKNOWN_POOL = 2000
"""Ids nobody registers, the other half of the outside candidates."""


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    env: dict[str, str]
    rates: tuple[float, ...]


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config(
            "baseline",
            "the configuration before the capacity work: 1 worker, fp32, TorchScript, a "
            "model thread",
            {
                "IFA_WORKERS": "1",
                "IFA_PROGRAM_FORMAT": "torchscript",
                "IFA_PRECISION": "fp32",
                "IFA_MODEL_EXECUTION": "thread",
            },
            (40, 80, 100, 120, 140, 160),
        ),
        Config(
            "defaults",
            "the service's defaults: one worker per CPU, program format auto, precision "
            "auto (bf16 where the CPU has it), the scorer inline on each worker's event loop",
            {},
            (100, 150, 200, 225, 250, 275, 300),
        ),
        Config(
            "threaded",
            "the defaults with a model thread per worker (model_execution=thread)",
            {"IFA_MODEL_EXECUTION": "thread"},
            (100, 125, 150, 200),
        ),
        Config(
            "fp32",
            "the defaults with precision fp32 (the scorer's towers in float32)",
            {"IFA_PRECISION": "fp32"},
            (100, 150, 175, 200, 250),
        ),
        Config(
            "cache-off",
            "the defaults with the state cache off: every /rank encodes the user's history "
            "window (max_history events)",
            {"IFA_STATE_CACHE": "off"},
            (5, 10, 15, 20, 30, 40),
        ),
    )
}


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


# -- one step ------------------------------------------------------------------------------------


def percentile_ms(values: Sequence[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q)) if len(values) else math.nan


def prepare_requests(
    traffic: Traffic, url: str, count: int, rng: np.random.Generator
) -> list[PreparedRequest]:
    """``count`` serialised requests in the configured /rank:/events mix, drawn in order."""
    config = traffic.config
    share = config.rank_weight / (config.rank_weight + config.events_weight)
    requests = []
    for is_rank in (rng.random(count) < share).tolist():
        if is_rank:
            body = traffic.rank_body()
            requests.append(
                prepare_post(url, "/rank", orjson.dumps(body), traffic.expected_items(body))
            )
        else:
            requests.append(prepare_post(url, "/events", orjson.dumps(traffic.events_body())))
    return requests


@dataclass(frozen=True)
class OpenLoopStep:
    offered_rps: float
    achieved_rps: float
    requests: int
    failures: int
    failure_kinds: dict[str, int]
    """Failed requests by route and status ("/rank 503"; status 0: no answer in time or a
    broken connection; "/rank 200": an answer without k items)."""
    rank_p50_ms: float
    rank_p99_ms: float
    rank_p999_ms: float
    events_p99_ms: float
    generator_lag_p99_ms: float
    generator_cpu_percent: float
    connections: int
    arrivals: ArrivalCheck
    server: ServerView
    load_average: float

    @property
    def foreign_arrivals(self) -> int:
        """Requests the service logged in the step's window beyond those this step sent: any
        is traffic from elsewhere (a straggling generator), and the step measured it too."""
        return max(0, self.arrivals.arrivals - self.requests)

    @property
    def generator_limited(self) -> bool:
        return (
            self.generator_lag_p99_ms > GENERATOR_LAG_LIMIT_MS
            or self.generator_cpu_percent > 100 * GENERATOR_CPU_LIMIT
        )

    @property
    def violations(self) -> list[str]:
        found = []
        if self.failures:
            kinds = ", ".join(f"{count}× {kind}" for kind, count in self.failure_kinds.items())
            found.append(f"{self.failures} failed ({kinds})")
        for name, value in (("/rank", self.rank_p99_ms), ("/events", self.events_p99_ms)):
            if not value <= BUDGET_MS:
                found.append(f"{name} p99 {value:.0f} ms")
        return found

    @property
    def passed(self) -> bool:
        return not self.violations


def run_open_loop_step(
    service: LiveService,
    arrival_dir: Path,
    traffic: Traffic,
    rate: float,
    seconds: float,
    rng: np.random.Generator,
) -> OpenLoopStep:
    schedule = poisson_schedule(rate, seconds, rng)
    requests = prepare_requests(traffic, service.url, len(schedule), rng)
    pid = service.process.pid
    before, (cpu_before, wait_before) = scrape(service.url), process_tree_seconds(pid)
    run: RunResult = run_open_loop(service.url, schedule, requests)
    after, (cpu_after, wait_after) = scrape(service.url), process_tree_seconds(pid)
    observed = read_arrivals(
        arrival_dir, run.started_unix - 0.05, run.started_unix + run.wall_seconds + 0.05
    )
    ranks = [o.latency for o in run.outcomes if o.route == "/rank"]
    posts = [o.latency for o in run.outcomes if o.route == "/events"]
    return OpenLoopStep(
        offered_rps=rate,
        achieved_rps=sum(o.ok for o in run.outcomes) / run.wall_seconds,
        requests=len(run.outcomes),
        failures=sum(not o.ok for o in run.outcomes),
        failure_kinds=dict(
            Counter(f"{o.route} {o.status}" for o in run.outcomes if not o.ok).most_common()
        ),
        rank_p50_ms=percentile_ms(ranks, 50),
        rank_p99_ms=percentile_ms(ranks, 99),
        rank_p999_ms=percentile_ms(ranks, 99.9),
        events_p99_ms=percentile_ms(posts, 99),
        generator_lag_p99_ms=percentile_ms([o.lag for o in run.outcomes], 99),
        generator_cpu_percent=100 * run.cpu_share,
        connections=run.connections,
        arrivals=check_arrivals(observed, schedule, rate, seconds),
        server=ServerView.between(
            before,
            after,
            cpu_seconds=cpu_after - cpu_before,
            runqueue_seconds=wait_after - wait_before,
            wall_seconds=run.wall_seconds,
        ),
        load_average=os.getloadavg()[0],
    )


@dataclass(frozen=True)
class LocustStep:
    offered_rps: float
    achieved_rps: float
    rank_p50_ms: float
    rank_p99_ms: float
    failures: int
    arrivals: ArrivalCheck


def run_locust_step(
    service: LiveService,
    arrival_dir: Path,
    traffic_config: TrafficConfig,
    rate: float,
    seconds: int,
    prefix: Path,
    processes: int,
) -> LocustStep:
    users = max(1, math.ceil(rate / LOCUST_USER_RPS))
    options = LoadOptions(
        host=service.url,
        users=users,
        spawn_rate=users,
        run_time_s=seconds,
        csv_prefix=prefix,
        traffic=replace(traffic_config, user_rps=rate / users),
        reset_stats=True,
        processes=processes,
    )
    started = time.time()
    summary = check(run_locust(options), BUDGET_MS, 0.0)
    ended = time.time()
    rank = next((g for g in summary.groups if g.name == "/rank"), None)
    # Locust's own window excludes spawning (reset_stats); the arrivals are checked over the
    # whole run, whose first second is the spawn.
    observed = read_arrivals(arrival_dir, started, ended)
    window = max(ended - started, 1.0)
    return LocustStep(
        offered_rps=rate,
        achieved_rps=summary.aggregated.requests_per_s,
        rank_p50_ms=rank.p50_ms if rank else math.nan,
        rank_p99_ms=rank.p99_ms if rank else math.nan,
        failures=summary.aggregated.failures,
        arrivals=check_arrivals(observed, None, rate, window),
    )


def process_tree_seconds(pid: int) -> tuple[float, float]:
    """(on-CPU, waiting-to-run) seconds of a process and its children (uvicorn's workers)."""
    on_cpu = waiting = 0.0
    for member in [pid, *child_pids(pid)]:
        cpu, wait = scheduler_seconds(member)
        on_cpu, waiting = on_cpu + cpu, waiting + wait
    return on_cpu, waiting


def child_pids(pid: int) -> list[int]:
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in path.read_text().split()]
    return found


# -- a configuration's curve ---------------------------------------------------------------------


def curve_name(config: Config, revision: str | None) -> str:
    """``CONFIG`` for this tree's service, ``CONFIG@REV`` for the baseline revision's."""
    return config.name if revision is None else f"{config.name}@{revision}"


def file_label(name: str, round_: int) -> str:
    """A curve's name and round as part of a file name (a revision may hold '/' or '~')."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-round{round_ + 1}"


@dataclass(frozen=True)
class Tree:
    """A source tree the service runs from: this one (``revision`` None) or a checkout."""

    root: Path
    model_dir: Path
    """The artefact its service serves: a scorer change ships inside the exported programs, so
    the baseline revision's curve serves the same checkpoint exported by that revision."""
    revision: str | None = None


@dataclass(frozen=True)
class Curve:
    config: Config
    revision: str | None
    """None: this tree's service; else the baseline revision's."""
    round: int
    """0-based round of ``--repeats``."""
    steps: list[OpenLoopStep]
    locust: list[LocustStep]

    @property
    def name(self) -> str:
        return curve_name(self.config, self.revision)

    @property
    def capacity(self) -> OpenLoopStep | None:
        """The passing step with the highest offered rate (p99 within budget, nothing failed)."""
        passing = [s for s in self.steps if s.passed]
        return max(passing, key=lambda s: s.offered_rps) if passing else None

    @property
    def capacity_rps(self) -> float:
        """The capacity's offered rate; 0 where no step passed (below the lowest rate)."""
        return self.capacity.offered_rps if self.capacity else 0.0


def curve_order(
    configs: Sequence[Config], trees: Sequence[Tree], repeats: int
) -> list[tuple[int, Config, Tree]]:
    """(round, configuration, tree) of every curve, in the order they run.

    Within a round, a configuration's curves on each tree run back to back, so that both see
    the same minutes of a shared machine; which tree goes first alternates between rounds, so
    that neither always follows the other's load.
    """
    return [
        (round_, config, tree)
        for round_ in range(repeats)
        for config in configs
        for tree in (trees if round_ % 2 == 0 else list(reversed(trees)))
    ]


def live_items(model_dir: Path, ids: Sequence[int], seed: int) -> dict[int, dict[str, int | None]]:
    """Attributes of the live pool: each id takes those of a catalogue item drawn at random, so
    it featurises to attribute values the model knows (one missing in the catalogue, stored
    negative, is sent as missing)."""
    _, path = catalogue_file(model_dir)
    table = pq.read_table(path)
    names = [n for n in table.column_names if n != "item_id"]
    columns = {n: table.column(n).to_numpy() for n in names}
    rows = np.random.default_rng(seed).integers(0, table.num_rows, len(ids)).tolist()
    return {
        int(item_id): {n: int(columns[n][row]) if columns[n][row] >= 0 else None for n in names}
        for item_id, row in zip(ids, rows, strict=True)
    }


def measure_curve(
    round_: int,
    config: Config,
    tree: Tree,
    redis_url: str,
    traffic_config: TrafficConfig,
    live: Mapping[int, Mapping[str, int | None]],
    args: argparse.Namespace,
    work: Path,
) -> Curve:
    """One curve: a fresh store seeded with the world, the tree's service with the
    configuration, the live pool registered, the state cache warmed, then :func:`run_curve`."""
    name = curve_name(config, tree.revision)
    slug = file_label(name, round_)
    # Every curve starts from the seeded world with nothing cached: no events, states or items
    # of the curve before (perhaps another revision's code, which may store them differently).
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    arrival_dir = work / f"arrivals-{slug}"
    for stale in arrival_dir.glob("arrivals-*.bin"):
        stale.unlink()
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_URL": redis_url,
        "IFA_REDIS_PREFIX": REDIS_PREFIX,
        "IFA_SEED_WORLD": str(traffic_config.world),
        "IFA_ARRIVAL_LOG": str(arrival_dir),
    } | config.env
    log = work / f"service-{slug}.log"
    with running_service(tree.model_dir, log, env, root=tree.root) as service:
        users, items = load_ids(traffic_config)
        traffic = Traffic(traffic_config, users, items)
        put_items(service.url, live)
        print(f"[{name}] warming the state cache of {args.users} users", flush=True)
        warm_state_cache(service.url, range(args.users), traffic.candidate_ids)
        return run_curve(config, tree.revision, round_, service, arrival_dir, traffic, args, work)


def run_curve(
    config: Config,
    revision: str | None,
    round_: int,
    service: LiveService,
    arrival_dir: Path,
    traffic: Traffic,
    args: argparse.Namespace,
    work: Path,
) -> Curve:
    name = curve_name(config, revision)
    slug = file_label(name, round_)
    rng = np.random.default_rng(args.seed)
    steps: list[OpenLoopStep] = []
    locust: list[LocustStep] = []
    failing = 0
    rates = args.rates.get(config.name, config.rates)
    # An unrecorded step first: the first seconds after the cache warm-up pay for collecting
    # its garbage and settling the workers, which no later step does.
    run_open_loop_step(service, arrival_dir, traffic, rates[0], WARMUP_STEP_SECONDS, rng)
    time.sleep(SETTLE_SECONDS)
    for rate in rates:
        step = run_open_loop_step(service, arrival_dir, traffic, rate, args.step_seconds, rng)
        steps.append(step)
        arrivals = step.arrivals
        print(
            f"[{name}] offered {rate:5.0f}/s achieved {step.achieved_rps:6.1f}/s  /rank "
            f"p50 {step.rank_p50_ms:5.1f} p99 {step.rank_p99_ms:6.1f} ms  /events p99 "
            f"{step.events_p99_ms:5.1f}  failures {step.failures}  generator lag p99 "
            f"{step.generator_lag_p99_ms:.1f} ms CPU {step.generator_cpu_percent:.0f} %  "
            f"max/20ms offered {arrivals.intended_max} server {arrivals.observed_max} "
            f"(Poisson q99.9 {arrivals.poisson_q999:.0f}), {arrivals.arrivals} arrivals for "
            f"{step.requests} sent  service CPU {step.server.cpu_percent:.0f} %",
            flush=True,
        )
        time.sleep(SETTLE_SECONDS)
        failing = 0 if step.passed else failing + 1
        if failing >= args.max_failing_steps:
            break
    # Locust after the whole open-loop curve, at the same rates: its bursts and the events it
    # posts then cannot leak into an open-loop step.
    for step in steps if args.locust else []:
        result = run_locust_step(
            service, arrival_dir, traffic.config, step.offered_rps, int(args.step_seconds),
            work / f"locust-{slug}-{step.offered_rps:g}rps", args.locust_processes,
        )  # fmt: skip
        locust.append(result)
        print(
            f"[{name}] Locust at {step.offered_rps:5.0f}/s: /rank p50 "
            f"{result.rank_p50_ms:g} p99 {result.rank_p99_ms:g} ms, failures {result.failures}, "
            f"max/20ms at the server {result.arrivals.observed_max}",
            flush=True,
        )
        time.sleep(SETTLE_SECONDS)
    return Curve(config, revision, round_, steps, locust)


# -- the report ----------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
        "busy_cpu_shares_at_start": busy_cpu_shares(),
    }


def describe_machine(facts: object) -> str:
    assert isinstance(facts, dict)
    text = (
        f"{facts['cpus']} CPUs ({facts['processor']}), Python {facts['python']}, torch "
        f"{facts['torch']}, 1-minute load average {facts['load_average_at_start']:.1f} at start"
    )
    for moment in ("start", "end"):
        shares = facts.get(f"busy_cpu_shares_at_{moment}")
        if shares:
            each = ", ".join(f"{100 * s:.0f} %" for s in shares)
            text += (
                f"; at the {moment}, {len(shares)} busy processes (one per CPU) got {each} of a "
                f"core each, {sum(shares):.2f} cores in all"
            )
    return text


def table_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


STEP_COLUMNS = (
    "offered req/s",
    "achieved req/s",
    "/rank p50 ms",
    "/rank p99 ms",
    "/rank p99.9 ms",
    "/events p99 ms",
    "failures",
    "generator lag p99 ms",
    "generator CPU %",
    "max arrivals in 20 ms: offered / at server / Poisson q99.9",
    "service CPU %",
    "model queue wait ms per /rank",
    "hit/stale/miss",
    "within budget",
    "Locust /rank p50 ms",
    "Locust /rank p99 ms",
    "Locust failures",
    "Locust max arrivals in 20 ms at server",
)


def step_cells(step: OpenLoopStep, locust: LocustStep | None) -> list[object]:
    arrivals, server = step.arrivals, step.server
    outcomes = server.cache_outcomes
    verdict = "yes" if step.passed else "no: " + ", ".join(step.violations)
    if step.generator_limited:
        verdict += " (generator-limited)"
    if step.foreign_arrivals:
        verdict += f" ({step.foreign_arrivals} requests from elsewhere arrived)"
    cells: list[object] = [
        f"{step.offered_rps:g}",
        f"{step.achieved_rps:.1f}",
        f"{step.rank_p50_ms:.1f}",
        f"{step.rank_p99_ms:.1f}",
        f"{step.rank_p999_ms:.1f}",
        f"{step.events_p99_ms:.1f}",
        step.failures,
        f"{step.generator_lag_p99_ms:.1f}",
        f"{step.generator_cpu_percent:.0f}",
        f"{arrivals.intended_max} / {arrivals.observed_max} / {arrivals.poisson_q999:.0f}",
        f"{server.cpu_percent:.0f}",
        f"{server.stage_mean_ms.get('model_queue', math.nan):.2f}",
        "/".join(str(outcomes.get(o, 0)) for o in ("hit", "stale", "miss")),
        verdict,
    ]
    if locust is None:
        return [*cells, "", "", "", ""]
    return [
        *cells,
        f"{locust.rank_p50_ms:g}",
        f"{locust.rank_p99_ms:g}",
        locust.failures,
        f"{locust.arrivals.observed_max} (q99.9 {locust.arrivals.poisson_q999:.0f})",
    ]


def summarise(curves: Sequence[Curve], revision: str | None) -> dict[str, Any]:
    """Each curve's capacity per round (0: no step passed), its median over the rounds, and,
    with a baseline revision, this tree's capacity over that revision's per configuration:
    per round, their median, and the ratio of the two medians."""
    capacities: dict[str, list[float]] = {}
    for curve in sorted(curves, key=lambda c: c.round):  # stable: run order within a round
        capacities.setdefault(curve.name, []).append(curve.capacity_rps)
    medians = {name: statistics.median(values) for name, values in capacities.items()}
    ratios: dict[str, dict[str, Any]] = {}
    configs = {c.config.name: c.config for c in curves}  # run order; Config is unhashable
    for config in configs.values() if revision is not None else ():
        ours, theirs = config.name, curve_name(config, revision)
        per_round = [
            a / b if b else None for a, b in zip(capacities[ours], capacities[theirs], strict=True)
        ]
        known = [r for r in per_round if r is not None]
        ratios[config.name] = {
            "per_round": per_round,
            "median": statistics.median(known) if known else None,
            "of_medians": medians[ours] / medians[theirs] if medians[theirs] else None,
        }
    return {
        "rounds": 1 + max(c.round for c in curves),
        "capacity_rps": capacities,
        "median_rps": medians,
        "ratio_to_revision": ratios,
    }


def rate_cell(rps: float) -> str:
    return f"{rps:g}" if rps else "none passed"


def ratio_cell(ratio: float | None) -> str:
    return f"{ratio:.2f}×" if ratio is not None else ""


def to_markdown(report: dict[str, Any], curves: list[Curve]) -> str:
    setup, summary = report["setup"], report["summary"]
    rounds, revision = summary["rounds"], setup["baseline_revision"]
    medians = summary["median_rps"]
    trees = f"this tree (`{setup['tree_commit']}`)"
    if revision is not None:
        trees += (
            f" and, side by side, revision `{revision}` (`{setup['baseline_commit']}`) run from "
            "a checkout of it with the same Python environment, model, world and Redis server"
        )
    lines = [
        "# Capacity within the 50 ms p99 budget",
        "",
        f"Generated by `{setup['command']}` on {report['date']} "
        f"({report['duration_s']} s). Model `{setup['model_version']}`; {setup['users']} users "
        f"with {setup['events_per_user']:,} events each, seeded into a private redis-server "
        f"(flushed and seeded again before each curve); {setup['candidates']:,} candidates per "
        f"/rank, k = 50, of which {100 * setup['outside_share']:g} % are outside the model's "
        f"catalogue in every request: half live-catalogue items registered with PUT /items "
        f"before each curve (a pool of {setup['live_pool']:,}, attributes drawn from the "
        f"catalogue's), half ids nobody knows (a pool of {setup['unknown_pool']:,}), both "
        f"recurring across requests; /rank:/events = 4:1 (10 events per post); Poisson "
        f"arrivals; {setup['step_seconds']} s per step; the generator runs on the same machine. "
        f"Services: {trees}. {rounds} round{'s' if rounds > 1 else ''}: each runs every curve, "
        "a configuration's curves back to back, the tree that goes first alternating between "
        f"rounds. Machine: {describe_machine(report['machine'])}.",
        "",
        "Latency is measured by the schedule-driven generator (`loadtest/openloop.py`) from each "
        "request's intended send time, so a stall anywhere counts against every request that "
        "should have been sent during it. A step passes when the p99 of /rank and of /events "
        f"are within {BUDGET_MS:g} ms and no request failed (a failure is a non-2xx answer, a "
        "/rank without k items, or no answer within 10 s). Capacity is the highest passing "
        "offered rate. The arrival check reads the service's own arrival log: the most "
        "requests it received within any 20 ms, beside the most the offered schedule held and "
        "the 99.9 % quantile of that maximum for a Poisson stream of the offered rate (by "
        "simulation). A step is marked generator-limited where the generator sent its p99 "
        f"request more than {GENERATOR_LAG_LIMIT_MS:g} ms late or used more than "
        f"{100 * GENERATOR_CPU_LIMIT:.0f} % of a core.",
        "",
        "| curve | "
        + " | ".join(f"round {r + 1}, req/s" for r in range(rounds))
        + " | median | median vs `baseline` |",
        "|---|" + "---:|" * (rounds + 2),
    ]
    first = {curve.name: curve for curve in reversed(curves)}
    for name, values in summary["capacity_rps"].items():
        base = curve_name(CONFIGS["baseline"], first[name].revision)
        vs = medians[name] / medians[base] if medians.get(base) else None
        cells = [name, *map(rate_cell, values), rate_cell(medians[name]), ratio_cell(vs)]
        lines.append(table_row(cells))
    if summary["ratio_to_revision"]:
        lines += [
            "",
            f"## This tree against `{revision}`",
            "",
            f"Capacity of each configuration on this tree over its capacity on `{revision}`.",
            "",
            "| configuration | "
            + " | ".join(f"round {r + 1}" for r in range(rounds))
            + " | median of the rounds | ratio of the medians |",
            "|---|" + "---:|" * (rounds + 2),
        ]
        for config_name, ratio in summary["ratio_to_revision"].items():
            cells = [config_name, *map(ratio_cell, ratio["per_round"])]
            lines.append(
                table_row([*cells, ratio_cell(ratio["median"]), ratio_cell(ratio["of_medians"])])
            )
    for curve in curves:
        by_rate = {step.offered_rps: step for step in curve.locust}
        source = (
            "this tree"
            if curve.revision is None
            else f"a checkout of `{curve.revision}` (`{setup['baseline_commit']}`)"
        )
        lines += [
            "",
            f"## {curve.name}, round {curve.round + 1}: {curve.config.description}",
            "",
            "Settings: "
            + (
                ", ".join(f"`{k}={v}`" for k, v in curve.config.env.items())
                or "none (the defaults)"
            )
            + f"; the service from {source}.",
            "",
            table_row(STEP_COLUMNS),
            "|" + "---:|" * len(STEP_COLUMNS),
        ]
        lines += [table_row(step_cells(s, by_rate.get(s.offered_rps))) for s in curve.steps]
    lines += locust_comparison(curves)
    lines += ["", f"![latency vs offered load]({report['plot']})", ""]
    return "\n".join(lines)


def locust_comparison(curves: list[Curve]) -> list[str]:
    """What a Locust user would have concluded from the same steps, and the arrivals that
    explain the difference."""
    pairs = [
        (step, locust)
        for curve in curves
        for step in curve.steps
        for locust in curve.locust
        if locust.offered_rps == step.offered_rps and step.rank_p99_ms > 0
    ]
    if not pairs:
        return []
    ratios = [locust.rank_p99_ms / step.rank_p99_ms for step, locust in pairs]
    bursty = [locust for _, locust in pairs if locust.arrivals.bursty]
    open_bursty = [step for step, _ in pairs if step.arrivals.bursty]
    worst = max((locust for _, locust in pairs), key=lambda s: s.arrivals.observed_max)
    passing_locust = sum(
        1 for _, locust in pairs if locust.rank_p99_ms <= BUDGET_MS and not locust.failures
    )
    passing_open = sum(1 for step, _ in pairs if step.passed)
    return [
        "",
        "## Locust against the schedule-driven generator",
        "",
        f"Over the {len(pairs)} steps offered both ways, Locust's /rank p99 was "
        f"{min(ratios):.1f}–{max(ratios):.1f}× the schedule-driven p99 (median "
        f"{statistics.median(ratios):.1f}×); {passing_locust} of those steps were within the "
        f"budget by Locust's figures, {passing_open} by the schedule-driven ones. At the "
        f"service, Locust's arrivals were burstier than a Poisson stream of the same rate "
        f"(more arrivals in some 20 ms than the Poisson 99.9 % quantile) in {len(bursty)} of "
        f"{len(pairs)} steps, the worst {worst.arrivals.observed_max} arrivals in 20 ms at "
        f"{worst.offered_rps:g} req/s offered (Poisson 99.9 %: "
        f"{worst.arrivals.poisson_q999:.0f}); the schedule-driven generator's were in "
        f"{len(open_bursty)}.",
        "",
        "Why they differ: Locust runs every simulated user as a greenlet on one gevent loop per "
        "process. When that loop is late (its own CPU, garbage collection, statistics), the "
        "users whose waits expired meanwhile all send as soon as it resumes, so the service "
        "receives a burst the offered rate does not contain and queues it on its model "
        "threads; Locust then times each request from its actual send, so its own delay is "
        "hidden while the queueing it caused is charged to the service. The shipped locustfile "
        "draws and serialises the /rank bodies once at start and the capacity run gives Locust "
        "one process per core (`--processes`), which lowers its CPU per request; the arrival "
        "counts above say how far that goes on this machine. The schedule-driven generator "
        "sends at precomputed times from one asyncio loop with pre-serialised bodies, "
        "measures from the intended send and reports its own lag, so neither effect can hide.",
    ]


def plot(curves: list[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10")
    # One colour per configuration, one line style per tree; rounds share their curve's legend.
    configs = list(dict.fromkeys(c.config.name for c in curves))
    for curve in curves:
        colour = colours(configs.index(curve.config.name) % 10)
        marker = "o-" if curve.revision is None else "s--"
        first = curve.round == 0
        axis.plot(
            [s.offered_rps for s in curve.steps],
            [s.rank_p99_ms for s in curve.steps],
            marker,
            color=colour,
            alpha=1.0 if first else 0.5,
            label=f"{curve.name}: /rank p99 (open loop)" if first else None,
        )
        if curve.locust:
            axis.plot(
                [s.offered_rps for s in curve.locust],
                [s.rank_p99_ms for s in curve.locust],
                "x:",
                color=colour,
                alpha=1.0 if first else 0.5,
                label=f"{curve.name}: /rank p99 (Locust)" if first else None,
            )
    axis.axhline(BUDGET_MS, color="black", linestyle=":", label=f"{BUDGET_MS:g} ms budget")
    axis.set_xlabel("offered load (requests/s, /rank + /events, Poisson)")
    axis.set_ylabel("latency (ms, from the intended send)")
    axis.set_yscale("log")
    axis.set_title("Latency against offered load")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
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


# -- main ----------------------------------------------------------------------------------------


def ensure_model(model_dir: Path) -> None:
    """Build the demo model the README uses where the directory has none."""
    if (model_dir / "LATEST").is_file():
        return
    print(f"no {model_dir}/LATEST: building the demo model", flush=True)
    subprocess.run(
        [sys.executable, "-m", "model.demo", "--out", str(model_dir)], cwd=REPO_ROOT, check=True
    )


def catalogue_file(model_dir: Path) -> tuple[str, Path]:
    """(model version, path of the model's catalogue: ``item_id`` and its attribute columns)."""
    from model.artifact import load_manifest, resolve_artifact_dir

    manifest = load_manifest(model_dir)
    return manifest.version, resolve_artifact_dir(model_dir) / manifest.catalogue_file


def catalogue_item_ids(model_dir: Path) -> tuple[str, np.ndarray]:
    version, path = catalogue_file(model_dir)
    ids = pq.read_table(path, columns=["item_id"]).column("item_id").to_numpy()
    return version, np.asarray(ids, dtype=np.int64)


def git_commit(revision: str) -> str:
    """The short commit of ``revision`` in this repository."""
    return subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=REPO_ROOT, check=True,
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def tree_commit() -> str:
    """This tree's commit, marked ``-dirty`` where it has uncommitted changes."""
    return subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, check=True,
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def parse_configs(text: str) -> list[Config]:
    names = text.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown configurations {unknown}; known: {list(CONFIGS)}"
        )
    return [CONFIGS[n] for n in names]


def parse_rates(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, rates = text.partition("=")
    if name not in CONFIGS or not rates:
        raise argparse.ArgumentTypeError(
            f"expected CONFIG=r1,r2,... with CONFIG in {list(CONFIGS)}"
        )
    return name, tuple(float(r) for r in rates.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/capacity"),
        help="writes <out>.md, <out>.json, <out>.png",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/capacity"))
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=parse_configs("baseline,defaults"),
        help=f"comma-separated, from {list(CONFIGS)}",
    )
    parser.add_argument(
        "--rates",
        type=parse_rates,
        action="append",
        default=[],
        metavar="CONFIG=R1,R2,...",
        help="offered requests/s of a configuration's steps (repeatable)",
    )
    parser.add_argument("--users", type=int, default=100, help="users in the load world")
    parser.add_argument("--events-per-user", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument(
        "--max-failing-steps",
        type=int,
        default=2,
        help="stop a curve after this many consecutive steps over budget",
    )
    parser.add_argument(
        "--locust",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also offer each step's rate with Locust",
    )
    parser.add_argument(
        "--locust-processes", type=int, default=2, help="Locust worker processes (--processes)"
    )
    parser.add_argument(
        "--outside-share",
        type=float,
        default=0.2,
        help="share of every candidate set outside the model's catalogue: half live-catalogue "
        "items registered with PUT /items, half ids nobody knows",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run every configuration against the service of git revision REV (a "
        "checkout of it, the same venv, model, world and Redis), named CONFIG@REV",
    )
    parser.add_argument(
        "--baseline-model-dir",
        type=Path,
        help="the artefact the baseline revision serves (default: --model-dir); export the same "
        "checkpoint with that revision's code when the programs changed between the two",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds, each running every curve; the report gives each round and the median",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.rates = dict(args.rates)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    # Absolute: the baseline revision's service runs with its checkout as working directory.
    args.model_dir = args.model_dir.resolve()
    args.baseline_model_dir = (args.baseline_model_dir or args.model_dir).resolve()
    started = time.time()
    facts = machine()  # before any load: what the machine gives when nothing else runs
    ensure_model(args.model_dir)
    version, item_ids = catalogue_item_ids(args.model_dir)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    world = write_world(work / "world", item_ids, args.users, args.events_per_user)
    traffic_config = TrafficConfig(
        world=world,
        candidates=args.candidates,
        outside_share=args.outside_share,
        live_pool=LIVE_POOL,
        unknown_pool=UNKNOWN_POOL,
    )
    pools = Traffic(traffic_config, *load_ids(traffic_config))
    live = live_items(args.model_dir, pools.live_ids, args.seed)

    curves: list[Curve] = []
    with ExitStack() as stack:
        trees = [Tree(REPO_ROOT, args.model_dir)]
        if args.baseline is not None:
            baseline_root = stack.enter_context(checkout(args.baseline))
            trees.append(Tree(baseline_root, args.baseline_model_dir, args.baseline))
        redis_url = stack.enter_context(redis_server(work))
        for round_, config, tree in curve_order(args.configs, trees, args.repeats):
            name = curve_name(config, tree.revision)
            print(f"[{name}] round {round_ + 1} of {args.repeats}", flush=True)
            curves.append(
                measure_curve(round_, config, tree, redis_url, traffic_config, live, args, work)
            )

    out = args.out
    summary = summarise(curves, args.baseline)
    report: dict[str, Any] = {
        "plot": f"{out.name}.png",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": round(time.time() - started),
        "machine": facts | {"busy_cpu_shares_at_end": busy_cpu_shares()},
        "setup": {
            "command": "python -m loadtest.capacity " + " ".join(argv if argv else sys.argv[1:]),
            "model_version": version,
            "tree_commit": tree_commit(),
            "baseline_revision": args.baseline,
            "baseline_commit": git_commit(args.baseline) if args.baseline else None,
            "model_dir": str(args.model_dir),
            "baseline_model_dir": str(args.baseline_model_dir) if args.baseline else None,
            "repeats": args.repeats,
            "users": args.users,
            "events_per_user": args.events_per_user,
            "candidates": args.candidates,
            "outside_share": args.outside_share,
            "outside_per_rank": {
                "live": pools.live_per_request,
                "unknown": pools.unknown_per_request,
            },
            "live_pool": LIVE_POOL,
            "unknown_pool": UNKNOWN_POOL,
            "step_seconds": args.step_seconds,
            "budget_ms": BUDGET_MS,
            "max_failing_steps": args.max_failing_steps,
            "locust_processes": args.locust_processes if args.locust else None,
        },
        "summary": summary,
        "curves": [
            {
                "name": c.name,
                "config": c.config.name,
                "revision": c.revision,
                "round": c.round + 1,
                "description": c.config.description,
                "env": c.config.env,
                "capacity_rps": c.capacity.offered_rps if c.capacity else None,
                "steps": [
                    asdict(s) | {"generator_limited": s.generator_limited, "passed": s.passed}
                    for s in c.steps
                ],
                "locust": [asdict(s) for s in c.locust],
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
