"""``python -m service.bench``: where the time of a /rank goes, in-process and over HTTP.

For candidate sets M ∈ {100, 500, 1000, 2000} and users with N = 10,000-event histories, with
the state cached (hit) and not (miss: the whole history is encoded), it measures

* in-process (the ASGI app driven by httpx, no network), memory and Redis stores: each stage's
  p50/p99 (validate, featurize, state_fetch, encode, forward, serialise) and the server time of
  the request; the serving overhead is server time minus the scorer's forward;
* over HTTP (``python -m service`` under uvicorn, Redis store, httpx client on loopback): the
  client-side latency;
* the Redis state: bytes per user (the value and Redis's own MEMORY USAGE) and the p50/p99 of a
  state fetch on loopback;
* the featurize stage at M = 1000 on the Redis store with 0 %, 10 % and 100 % of the candidates
  outside the worker's item cache (fetched from the item table in the request), side by side.
* CPU per request of the service as deployed (``python -m service`` with its defaults, Redis
  store, histories of N events, M = 1000): the on-CPU time of its processes (Linux schedstat)
  over an open-loop stream of /rank, then of /events, divided by the requests served. With
  ``--baseline REV`` the same runs against that revision's service, started beside this one and
  measured in alternating blocks, so that both see the same machine load. CPU time, unlike
  latency, does not grow when other processes compete for the cores.

``--parts featurize`` (the featurize stage per candidate inside and outside the model's catalogue,
this tree beside ``--baseline REV``) is :mod:`service.featurize_bench`'s, written to
results/featurize_bench.{md,json}. ``--parts footprint`` (bytes per user in Redis, this tree
beside ``--baseline REV``) and ``--parts soak`` (Redis memory under open-loop load) are
:mod:`service.footprint`'s, written to results/footprint.{md,json}. The other parts' results go
to results/service_bench.{md,json}.
Without --model-dir (or ./artifacts/LATEST) it serves an untrained IFA of the default spec with a
synthetic 100k-item catalogue: latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import torch
from prometheus_client.parser import text_string_to_metric_families

from loadtest.capacity import process_tree_seconds
from loadtest.harness import (
    REPO_ROOT,
    LiveService,
    checkout,
    running_service,
    warm_state_cache,
)
from loadtest.openloop import PreparedRequest, poisson_schedule, prepare_post, run_open_loop
from loadtest.traffic import Traffic, TrafficConfig
from service.app import create_app
from service.settings import Settings
from service.stores.base import SeedHistories
from service.stores.records import pack_records
from service.stores.redis import RedisStore

SIZES = (100, 500, 1000, 2000)
HISTORY = 10_000
T0 = 1.7e9
STAGES = ("validate", "featurize", "state_fetch", "encode", "forward", "serialise")
OVERHEAD_TARGET = 0.5
"""Serving overhead at M = 1000 should stay within 50 % of the forward pass."""
OUTSIDE_CACHE_SHARES = (0.0, 0.1, 1.0)
"""Shares of a 1000-candidate set that the worker's item cache does not hold."""
TABLE_ITEMS = 20_000
"""Items the item-table benchmark writes: as many new ids, and as many catalogue overrides."""
WARM_ITEMS = 5_000
"""Ids the item-table benchmark caches first; the cached part of each set is drawn from them."""


# -- inputs -----------------------------------------------------------------------------------


def build_untrained_artifact(out: Path) -> Path:
    from model.catalogue import Catalogue
    from model.checkpoint import Checkpoint
    from model.export import export_artifact
    from model.features import default_spec
    from model.nets import build_net

    torch.manual_seed(0)
    spec = default_spec()
    rng = np.random.default_rng(0)
    n = 100_000
    catalogue = Catalogue(
        {
            "item_id": np.arange(n),
            "category": rng.integers(0, 64, n),
            "author": rng.integers(0, 4096, n),
        },
        spec,
    )
    net = build_net("ifa", spec)
    export_artifact(Checkpoint("ifa", spec, net), catalogue, out, formats=("torchscript",))
    return out


def histories(user_ids: Sequence[int], item_ids: np.ndarray, seed: int) -> SeedHistories:
    """HISTORY events per user over the catalogue's items, an event a minute."""
    rng = np.random.default_rng(seed)
    total = len(user_ids) * HISTORY
    records = pack_records(
        rng.choice(item_ids, total),
        rng.integers(0, 4, total),
        np.tile(T0 + 60.0 * np.arange(HISTORY), len(user_ids)),
    )
    return SeedHistories(
        user_ids=np.asarray(user_ids, dtype=np.int64),
        bounds=np.arange(len(user_ids) + 1, dtype=np.int64) * HISTORY,
        records=records,
    )


class Recorder:
    """Per-request timings from the app's metrics listener (requests run one at a time).

    A request's record closes on "request_cpu", which :class:`LoopCpuTimer` reports last.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.requests: list[dict[str, float]] = []

    def __call__(self, name: str, seconds: float) -> None:
        self.current[name] += seconds
        if name == "request_cpu":
            self.requests.append(dict(self.current))
            self.current = defaultdict(float)


class LoopCpuTimer:
    """ASGI wrapper: the event-loop thread's CPU time per request.

    Everything of a /rank but the model runs on the loop thread, and with inline model execution
    (the default) the scorer does too; the scorer's own CPU time, measured around it, is then
    subtracted (:func:`summarise`), which leaves the serving work in CPU seconds: unlike wall
    time, it does not grow when other processes compete for the cores.
    """

    def __init__(self, app: Any, recorder: Recorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.thread_time()
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.recorder("request_cpu", time.thread_time() - started)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64) * 1000.0
    return {
        "p50_ms": float(np.percentile(array, 50)),
        "p99_ms": float(np.percentile(array, 99)),
        "n": len(array),
    }


def body(user: int, candidates: np.ndarray, k: int = 50) -> dict[str, Any]:
    return {"user_id": user, "candidate_ids": candidates.tolist(), "k": k}


# -- in-process -------------------------------------------------------------------------------


@asynccontextmanager
async def recorded_app(
    settings: Settings,
) -> AsyncIterator[tuple[Any, Recorder, httpx.AsyncClient]]:
    """The app with its lifespan running, a recorder of its per-request timings and a client
    that calls it in-process."""
    app = create_app(settings)
    recorder = Recorder()
    app.state.metrics.add_listener(recorder)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=LoopCpuTimer(app, recorder))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            yield app, recorder, client


async def in_process(
    settings: Settings, item_ids: np.ndarray, hits: int, misses: int, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    async with recorded_app(settings) as (app, recorder, client):
        miss_users = [1_000_000 + seed * 100_000 + i for i in range(misses * len(SIZES))]
        await app.state.services.store.seed(histories([7, *miss_users], item_ids, seed))
        for m in SIZES:
            candidates = [rng.choice(item_ids, m, replace=False) for _ in range(8)]
            await client.post("/rank", json=body(7, candidates[0]))  # cache the state
            for cache, users in (("hit", [7] * hits), ("miss", miss_users[:misses])):
                if cache == "miss":
                    miss_users = miss_users[misses:]
                recorder.requests.clear()
                for i, user in enumerate(users):
                    response = await client.post("/rank", json=body(user, candidates[i % 8]))
                    assert response.status_code == 200, response.text
                    assert response.json()["state_cache"] == cache
                results[f"{cache}/{m}"] = summarise(
                    recorder.requests, inline=settings.model_execution == "inline"
                )
    return results


def summarise(requests: list[dict[str, float]], inline: bool) -> dict[str, Any]:
    """Stage and server percentiles; ``inline``: the scorer ran on the loop thread, so its CPU
    is taken out of the loop thread's to give the serving CPU."""
    stages = {s: percentiles([r.get(s, 0.0) for r in requests]) for s in STAGES}
    overhead = [r["request"] - r.get("forward", 0.0) - r.get("encode", 0.0) for r in requests]
    return {
        "stages": stages,
        "server": percentiles([r["request"] for r in requests]),
        "overhead": percentiles(overhead),
        "forward_cpu": percentiles([r.get("forward_cpu", 0.0) for r in requests]),
        "serving_cpu": percentiles(
            [r["request_cpu"] - (r.get("forward_cpu", 0.0) if inline else 0.0) for r in requests]
        ),
    }


# -- the item table ---------------------------------------------------------------------------


async def item_lookups(
    settings: Settings, item_ids: np.ndarray, requests: int, seed: int
) -> dict[str, Any]:
    """Featurize (and server) time of /rank at M = 1000, state cached, for each share of the
    candidates outside the worker's item cache: those are ids never looked up before (catalogue
    items, some overridden, and new items of the table), so each request fetches them."""
    m = 1000
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    async with recorded_app(settings) as (app, recorder, client):
        store = app.state.services.store
        new_ids = np.arange(10**12, 10**12 + TABLE_ITEMS)
        overridden = rng.choice(item_ids, TABLE_ITEMS, replace=False)
        await store.put_items(
            {
                int(i): {"category": int(rng.integers(0, 64)), "author": int(rng.integers(0, 4096))}
                for i in np.concatenate([new_ids, overridden])
            }
        )
        pool = rng.permutation(np.concatenate([item_ids, new_ids]))
        warm, cold = pool[:WARM_ITEMS], pool[WARM_ITEMS:]
        needed = requests * sum(round(m * share) for share in OUTSIDE_CACHE_SHARES)
        if needed > len(cold):
            raise ValueError(f"{requests} requests per share need {needed} unseen ids")
        # The user's history is over the warm ids: encoding it must not cache a cold one.
        await store.seed(histories([7], warm, seed))
        for chunk in np.array_split(warm, WARM_ITEMS // m):  # the state and the warm ids
            assert (await client.post("/rank", json=body(7, chunk))).status_code == 200
        registry = app.state.metrics.registry

        def fetched() -> float:
            return registry.get_sample_value("ifa_item_cache_total", {"outcome": "miss"}) or 0

        # The shares take turns, request by request, so that whatever else loads the machine
        # weighs on each alike.
        timings: dict[float, list[dict[str, float]]] = {share: [] for share in OUTSIDE_CACHE_SHARES}
        fetched_before = fetched()
        for _ in range(requests):
            for share, seen in timings.items():
                outside = round(m * share)
                unseen, cold = cold[:outside], cold[outside:]
                cached = rng.choice(warm, m - outside, replace=False)
                candidates = rng.permutation(np.concatenate([cached, unseen]))
                response = await client.post("/rank", json=body(7, candidates))
                assert response.status_code == 200, response.text
                assert response.json()["state_cache"] == "hit"
                seen.append(recorder.requests[-1])
        # Exactly the unseen ids went to the table: the scenario is the one named.
        assert fetched() - fetched_before == needed
        for share, seen in timings.items():
            results[f"{share:.0%}"] = {
                "outside_cache": round(m * share),
                "featurize": percentiles([r["featurize"] for r in seen]),
                "server": percentiles([r["request"] for r in seen]),
                "serving_cpu": percentiles([r["request_cpu"] for r in seen]),
            }
    return results


# -- over HTTP --------------------------------------------------------------------------------


@contextmanager
def uvicorn_process(model_dir: Path, settings: dict[str, str]) -> Iterator[str]:
    """The service as a process with ``IFA_<NAME>`` settings; yields its URL."""
    env = {f"IFA_{k.upper()}": v for k, v in settings.items()}
    with (
        tempfile.TemporaryDirectory(prefix="ifa-bench-service-") as scratch,
        running_service(
            model_dir, Path(scratch) / "service.log", env, timeout=120,
            args=["--log-level", "warning"],
        ) as service,
    ):  # fmt: skip
        yield service.url


Buckets = dict[str, list[tuple[float, float]]]
"""Per series (a stage, or "request"): cumulative (upper bound, count) pairs."""


def scrape(client: httpx.Client) -> Buckets:
    series: Buckets = defaultdict(list)
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "ifa_rank_stage_duration_seconds_bucket":
                key = sample.labels["stage"]
            elif (
                sample.name == "ifa_http_request_duration_seconds_bucket"
                and sample.labels.get("route") == "/rank"
            ):
                key = "request"
            else:
                continue
            series[key].append((float(sample.labels["le"]), sample.value))
    return series


def histogram_quantile(q: float, before: list[tuple[float, float]],
                       after: list[tuple[float, float]]) -> float:  # fmt: skip
    """Prometheus's histogram_quantile over the observations between two scrapes, in ms."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(sorted(after), sorted(before), strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for le, cumulative in counts:
        if cumulative >= rank:
            if le == float("inf"):
                return lower * 1000.0
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return (lower + (le - lower) * share) * 1000.0
        lower, below = le, cumulative
    return lower * 1000.0


def over_http(url: str, item_ids: np.ndarray, miss_users: list[int], hits: int, misses: int,
              seed: int) -> dict[str, Any]:  # fmt: skip
    """Client latency, and the server's stage percentiles estimated from its own histograms."""
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for m in SIZES:
            candidates = [rng.choice(item_ids, m, replace=False) for _ in range(8)]
            client.post("/rank", json=body(7, candidates[0]))
            for cache, users in (("hit", [7] * hits), ("miss", miss_users[:misses])):
                if cache == "miss":
                    miss_users = miss_users[misses:]
                latencies = []
                before = scrape(client)
                for i, user in enumerate(users):
                    started = time.perf_counter()
                    response = client.post("/rank", json=body(user, candidates[i % 8]))
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
                    assert response.json()["state_cache"] == cache
                after = scrape(client)
                results[f"{cache}/{m}"] = {
                    "client": percentiles(latencies),
                    "server_histograms": {
                        key: {
                            "p50_ms": histogram_quantile(0.5, before[key], after[key]),
                            "p99_ms": histogram_quantile(0.99, before[key], after[key]),
                        }
                        for key in (*STAGES, "request")
                    },
                }
    return results


# -- Redis state ------------------------------------------------------------------------------


async def redis_state(url: str, prefix: str, version: str, fetches: int) -> dict[str, Any]:
    """Size and fetch latency of user 7's cached state (``version``: the state version)."""
    store = RedisStore(url, prefix=prefix)
    try:
        blob = (await store.snapshot(version, 7, 3600)).state
        assert blob is not None, "user 7 has no cached state"
        usage = await store._client.memory_usage(store._key(7, f"state:{version}"))
        latencies = []
        for _ in range(fetches):
            started = time.perf_counter()
            await store.snapshot(version, 7, 3600)
            latencies.append(time.perf_counter() - started)
        return {
            "state_bytes": len(blob),
            "redis_memory_usage_bytes": int(usage or 0),
            "fetch": percentiles(latencies),
        }
    finally:
        await store.close()


# -- CPU per request, the service as deployed --------------------------------------------------

CPU_USERS = 100
CPU_CANDIDATES = 1000
CPU_RATE = 100.0
"""Offered req/s of the CPU blocks: well inside both revisions' capacity, so that nothing
queues and the figure is the work of a request, not of a backlog."""
CPU_ROUTES = ("/rank", "/events")
CPU_FAILURES_TOLERATED = 0.01
"""Share of a block's requests that may fail (a 503 when the shared machine stalls a worker)."""
MIX = {"/rank": 4, "/events": 1}
"""The load tests' mix: the CPU of an average request is the weighted mean of the routes'."""


def cpu_requests(traffic: Traffic, url: str, route: str, count: int) -> list[PreparedRequest]:
    if route == "/rank":
        bodies = [traffic.rank_body() for _ in range(count)]
        return [prepare_post(url, route, orjson.dumps(b), traffic.expected_items(b))
                for b in bodies]  # fmt: skip
    return [prepare_post(url, route, orjson.dumps(traffic.events_body())) for _ in range(count)]


def cpu_block(
    service: LiveService,
    traffic: Traffic,
    route: str,
    seconds: float,
    rng: np.random.Generator,
    strict: bool = True,
) -> tuple[float, int]:
    """CPU ms per request of ``route`` over an open-loop Poisson stream of :data:`CPU_RATE`, and
    the requests that failed. ``strict``: raise when more than :data:`CPU_FAILURES_TOLERATED`
    of them failed (a refusal costs less CPU than an answer, so the figure would flatter)."""
    schedule = poisson_schedule(CPU_RATE, seconds, rng)
    requests = cpu_requests(traffic, service.url, route, len(schedule))
    before, _ = process_tree_seconds(service.process.pid)
    run = run_open_loop(service.url, schedule, requests, warm_connections=8)
    after, _ = process_tree_seconds(service.process.pid)
    failed = [o.status for o in run.outcomes if not o.ok]
    if strict and len(failed) > CPU_FAILURES_TOLERATED * len(run.outcomes):
        raise RuntimeError(f"{len(failed)} of {len(run.outcomes)} {route} failed: {failed[:5]}")
    return 1000.0 * (after - before) / len(run.outcomes), len(failed)


def cpu_per_request(
    redis_url: str,
    trees: dict[str, tuple[Path, Path]],
    item_ids: np.ndarray,
    rounds: int,
    seconds: float,
    outside_share: float,
) -> dict[str, Any]:
    """CPU ms per request of each route, per service (label: (source tree, artefact it serves)),
    in alternating blocks: every round measures each service once, in turn, route after route.
    ``outside_share`` of every candidate set are ids outside the catalogue (a recurring pool)."""
    roots = {label: root for label, (root, _) in trees.items()}
    users = list(range(CPU_USERS))
    prefixes = {label: f"ifa-bench-cpu-{uuid.uuid4().hex[:8]}" for label in roots}
    blocks: dict[str, dict[str, list[float]]] = {
        label: {route: [] for route in CPU_ROUTES} for label in roots
    }
    failures = dict.fromkeys(roots, 0)
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ifa-bench-cpu-")))
        services: dict[str, LiveService] = {}
        for label, root in roots.items():
            stack.callback(asyncio.run, drop_prefix(redis_url, prefixes[label]))
            asyncio.run(seed_prefix(redis_url, prefixes[label], histories(users, item_ids, 3)))
            env = {"IFA_STORE": "redis", "IFA_REDIS_URL": redis_url,
                   "IFA_REDIS_PREFIX": prefixes[label]}  # fmt: skip
            services[label] = stack.enter_context(
                running_service(
                    trees[label][1],
                    scratch / f"service-{label}.log",
                    env,
                    args=["--log-level", "warning"],
                    root=root,
                )
            )
            warm_state_cache(services[label].url, users, item_ids[:CPU_CANDIDATES].tolist())
        config = TrafficConfig(candidates=CPU_CANDIDATES, outside_share=outside_share)
        rng = np.random.default_rng(5)
        order = list(roots)
        for label in order:  # unrecorded: the first requests of a worker pay for warming up
            traffic = Traffic(config, users, item_ids.tolist())
            cpu_block(services[label], traffic, "/rank", 5, rng, strict=False)
        for round_ in range(rounds):
            for label in order if round_ % 2 == 0 else order[::-1]:
                traffic = Traffic(config, users, item_ids.tolist())
                for route in CPU_ROUTES:
                    cpu, failed = cpu_block(services[label], traffic, route, seconds, rng)
                    blocks[label][route].append(cpu)
                    failures[label] += failed
                print(f"  round {round_ + 1}, {label}: " + ", ".join(
                    f"{route} {blocks[label][route][-1]:.2f}" for route in CPU_ROUTES
                ) + " CPU ms per request", flush=True)  # fmt: skip
    results: dict[str, Any] = {}
    for label, routes in blocks.items():
        medians = {route: statistics.median(values) for route, values in routes.items()}
        mixed = sum(MIX[r] * medians[r] for r in CPU_ROUTES) / sum(MIX.values())
        results[label] = {
            "blocks": routes, "median_ms": medians, "mix_ms": mixed, "failures": failures[label],
        }  # fmt: skip
    return results


async def seed_prefix(redis_url: str, prefix: str, seed: SeedHistories) -> None:
    store = RedisStore(redis_url, prefix=prefix)
    try:
        await store.seed(seed)
    finally:
        await store.close()


async def drop_prefix(redis_url: str, prefix: str) -> None:
    store = RedisStore(redis_url, prefix=prefix)
    try:
        await store.delete_prefix()
    finally:
        await store.close()


# -- report -----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Service benchmark",
        "",
        f"Generated by `{report['command']}`. "
        f"{report['machine']}; torch threads {report['torch_threads']}; model "
        f"{report['model_version']} ({report['model']}); N = {HISTORY} events per history; "
        f"{report['seconds']:.0f} s; 1-minute load average {report['load_average_at_start']:.1f} "
        f"at start, {report['load_average_at_end']:.1f} at end (the machine is shared: a load "
        "above 2 means other processes competed for the cores, and p99s suffer most). "
        "Times in ms.",
        "",
    ]
    if "cpu" in report:
        lines += cpu_markdown(report)
    if "http" in report:
        lines += latency_markdown(report)
    return "\n".join(lines)


def cpu_markdown(report: dict[str, Any]) -> list[str]:
    setup, runs = report["cpu_setup"], report["cpu"]
    lines = [
        "## CPU per request of the deployed service",
        "",
        f"`python -m service` with its defaults (one worker per CPU, program format auto, the "
        f"scorer inline), Redis store, {setup['users']} users with {setup['history']}-event "
        f"histories (states cached), /rank of M = {setup['candidates']}, k = 50, "
        f"{setup.get('outside_share', 0.0):.0%} of each set ids outside the catalogue (a recurring "
        f"pool); /events of 10 events. The baseline tree serves "
        f"{setup.get('baseline_model_dir') or 'the same artefact'}. "
        f"Open-loop Poisson arrivals at {setup['rate']:g} req/s from the generator of "
        f"loadtest/openloop.py, {setup['seconds']:g} s per route and block, {setup['rounds']} "
        "blocks per service; where two trees are listed their services ran side by side and "
        "were measured in alternating blocks. CPU = on-CPU time of the service's processes "
        "(schedstat) over the block ÷ requests sent; the figure is the median block, the "
        "4:1 mix the load tests' /rank:/events weighting of the medians; failed: requests "
        "without a 2xx answer of k items, over all blocks (a block with more than "
        f"{CPU_FAILURES_TOLERATED:.0%} failed stops the run).",
        "",
        "| tree | /rank CPU ms | /events CPU ms | 4:1 mix CPU ms | /rank blocks | failed |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, run in runs.items():
        median = run["median_ms"]
        blocks = ", ".join(f"{v:.2f}" for v in run["blocks"]["/rank"])
        lines.append(
            f"| {label} | {median['/rank']:.2f} | {median['/events']:.2f} | "
            f"{run['mix_ms']:.2f} | {blocks} | {run['failures']} |"
        )
    if len(runs) == 2:
        (old_label, old), (new_label, new) = runs.items()
        lines += [
            "",
            f"{new_label} against {old_label}: /rank "
            f"{new['median_ms']['/rank'] / old['median_ms']['/rank']:.2f}×, /events "
            f"{new['median_ms']['/events'] / old['median_ms']['/events']:.2f}×, the 4:1 mix "
            f"{new['mix_ms'] / old['mix_ms']:.2f}× the CPU per request.",
        ]
    return [*lines, ""]


def latency_markdown(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, runs in report["in_process"].items():
        lines += [
            f"## In-process, {name} store: stages p50 / p99",
            "",
            "| cache | M | " + " | ".join(STAGES) + " | server | overhead |",
            "|---|---:|" + "---:|" * (len(STAGES) + 2),
        ]
        for key, run in runs.items():
            cache, m = key.split("/")
            cells = [f"{run['stages'][s]['p50_ms']:.2f} / {run['stages'][s]['p99_ms']:.2f}"
                     for s in STAGES]  # fmt: skip
            for part in ("server", "overhead"):
                cells.append(f"{run[part]['p50_ms']:.2f} / {run[part]['p99_ms']:.2f}")
            lines.append(f"| {cache} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "overhead = server time − forward − encode: validation, featurisation, state fetch, "
        "executor hops, top-k and serialisation. Wall times include any wait for a core; the "
        "CPU-time ratio under Targets does not, and is the figure to trust on a loaded machine.",
        "",
        "## Over HTTP (uvicorn + httpx on loopback, Redis store): p50 / p99",
        "",
        "Stages and server time are estimated from the service's own Prometheus histograms "
        "(as histogram_quantile would); client = what the httpx client measured.",
        "",
        "| cache | M | " + " | ".join(STAGES) + " | server | client |",
        "|---|---:|" + "---:|" * (len(STAGES) + 2),
    ]
    for key, run in report["http"].items():
        cache, m = key.split("/")
        server = run["server_histograms"]
        cells = [f"{server[s]['p50_ms']:.2f} / {server[s]['p99_ms']:.2f}" for s in STAGES]
        cells.append(f"{server['request']['p50_ms']:.2f} / {server['request']['p99_ms']:.2f}")
        cells.append(f"{run['client']['p50_ms']:.2f} / {run['client']['p99_ms']:.2f}")
        lines.append(f"| {cache} | {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Featurize at M = 1000 with the item table (in-process, Redis store): p50 / p99",
        "",
        "Candidates outside the worker's item cache are fetched from the item table in the "
        "request (one round trip, in flight with the state fetch); the rest are answered from "
        f"the cache. The table holds {TABLE_ITEMS} new items and {TABLE_ITEMS} overrides of "
        "catalogue items; the state is cached (hit); the three cases take turns request by "
        "request. Featurize is wall time, so it includes whatever else the event loop ran "
        "while the lookup was in flight (the state fetch's reply); loop CPU is the request's "
        "CPU time on the event loop (the scorer runs inline there, so it is included).",
        "",
        "| outside the item cache | featurize | server | loop CPU |",
        "|---:|---:|---:|---:|",
    ]
    for share, run in report["item_lookups"].items():
        cells = [f"{run[part]['p50_ms']:.2f} / {run[part]['p99_ms']:.2f}"
                 for part in ("featurize", "server", "serving_cpu")]  # fmt: skip
        lines.append(f"| {share} ({run['outside_cache']} ids) | " + " | ".join(cells) + " |")
    o = report["overhead_at_1000"]
    r = report["redis_state"]
    lines += [
        "",
        "## Targets",
        "",
        "| what | measured | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for store, row in o.items():
        lines.append(
            f"| serving overhead / forward, M = 1000, cache hit, {store}: wall time (p50) | "
            f"{row['overhead_ms']:.2f} / {row['forward_ms']:.2f} ms = {row['ratio']:.0%} | "
            f"≤ {OVERHEAD_TARGET:.0%} | {'yes' if row['ratio'] <= OVERHEAD_TARGET else 'no'} |"
        )
        lines.append(
            f"| the same in CPU time: serving / scorer, {store} (p50) | "
            f"{row['serving_cpu_ms']:.2f} / {row['forward_cpu_ms']:.2f} ms = "
            f"{row['cpu_ratio']:.0%} | ≤ {OVERHEAD_TARGET:.0%} | "
            f"{'yes' if row['cpu_ratio'] <= OVERHEAD_TARGET else 'no'} |"
        )
    http_ratio = report["http_overhead_at_1000"]
    lines += [
        f"| over HTTP: client latency − forward, M = 1000, cache hit (p50, forward from the "
        f"server's histogram) | "
        f"{http_ratio['overhead_ms']:.2f} / {http_ratio['forward_ms']:.2f} ms = "
        f"{http_ratio['ratio']:.0%} | (informative) | |",
        f"| Redis state per user | {r['state_bytes']} B value, "
        f"{r['redis_memory_usage_bytes']} B in Redis | ≤ 16384 B | "
        f"{'yes' if r['redis_memory_usage_bytes'] <= 16384 else 'no'} |",
        "| Redis state fetch p99 (loopback; one script call: state, profile, log length) | "
        f"{r['fetch']['p99_ms']:.3f} ms "
        f"(p50 {r['fetch']['p50_ms']:.3f}) | ≤ 1 ms | "
        f"{'yes' if r['fetch']['p99_ms'] <= 1.0 else 'no'} |",
        "",
    ]
    return lines


async def run(args: argparse.Namespace, model_dir: Path, model_label: str) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(args.torch_threads)
    from model.artifact import load_artifact

    model = load_artifact(model_dir)
    item_ids = model.catalogue.item_ids.copy()
    version = model.manifest.version
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "torch_threads": args.torch_threads,
        "load_average_at_start": os.getloadavg()[0],
        "model": model_label,
        "model_version": version,
        "in_process": {},
    }
    print(f"model {version} ({model_label})", flush=True)
    if "latency" in args.parts:
        await latency(args, model_dir, model, report)
    if "cpu" in args.parts:
        print("CPU per request over HTTP (the service's defaults, Redis store) ...", flush=True)
        with ExitStack() as stack:
            trees = {"this tree": (REPO_ROOT, model_dir.resolve())}
            if args.baseline is not None:
                baseline_root = stack.enter_context(checkout(args.baseline))
                baseline_model = (args.baseline_model_dir or model_dir).resolve()
                trees = {args.baseline: (baseline_root, baseline_model)} | trees
            report["cpu"] = await asyncio.to_thread(
                cpu_per_request, args.redis_url, trees, item_ids, args.cpu_rounds,
                args.cpu_seconds, args.outside_share,
            )  # fmt: skip
        report["cpu_setup"] = {
            "rate": CPU_RATE, "seconds": args.cpu_seconds, "rounds": args.cpu_rounds,
            "users": CPU_USERS, "candidates": CPU_CANDIDATES, "history": HISTORY,
            "outside_share": args.outside_share,
            "baseline_model_dir": str(args.baseline_model_dir) if args.baseline_model_dir else None,
        }  # fmt: skip
    report["command"] = "python -m service.bench " + " ".join(args.argv)
    report["seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()[0]
    return report


async def latency(
    args: argparse.Namespace, model_dir: Path, model: Any, report: dict[str, Any]
) -> None:
    """The in-process and over-HTTP latency breakdowns, into ``report``."""
    item_ids = model.catalogue.item_ids.copy()
    version = model.manifest.version
    prefix = f"ifa-bench-{uuid.uuid4().hex[:8]}"
    common = {"model_dir": model_dir, "torch_threads": args.torch_threads, "log_level": "warning"}
    memory = Settings(**common)
    redis_settings = Settings(**common, store="redis", redis_url=args.redis_url,
                              redis_prefix=prefix)  # fmt: skip
    cleanup = RedisStore(args.redis_url, prefix=prefix)
    try:
        for name, settings in (("memory", memory), ("redis", redis_settings)):
            print(f"in-process, {name} store ...", flush=True)
            report["in_process"][name] = await in_process(
                settings, item_ids, args.hits, args.misses, seed=len(report["in_process"])
            )
        state_version = model.manifest.state_version or version
        report["redis_state"] = await redis_state(args.redis_url, prefix, state_version, 2000)

        print("item table, redis store ...", flush=True)
        items_settings = redis_settings.model_copy(
            update={"redis_prefix": f"{prefix}-items", "item_cache_ttl_seconds": 3600.0}
        )
        items_cleanup = RedisStore(args.redis_url, prefix=f"{prefix}-items")
        try:
            report["item_lookups"] = await item_lookups(
                items_settings, item_ids, args.item_requests, seed=5
            )
        finally:
            await items_cleanup.delete_prefix()
            await items_cleanup.close()

        print("over HTTP, redis store ...", flush=True)
        http_prefix = f"{prefix}-http"
        miss_users = [5_000_000 + i for i in range(args.misses * len(SIZES))]
        seeder = RedisStore(args.redis_url, prefix=http_prefix)
        await seeder.seed(histories([7, *miss_users], item_ids, seed=9))
        try:
            with uvicorn_process(
                model_dir,
                {"store": "redis", "redis_url": args.redis_url, "redis_prefix": http_prefix,
                 "torch_threads": str(args.torch_threads)},
            ) as url:  # fmt: skip
                report["http"] = await asyncio.to_thread(
                    over_http, url, item_ids, miss_users, args.hits, args.misses, 11
                )
        finally:
            await seeder.delete_prefix()
            await seeder.close()
    finally:
        await cleanup.delete_prefix()
        await cleanup.close()

    report["overhead_at_1000"] = {}
    for name, runs in report["in_process"].items():
        hit = runs["hit/1000"]
        forward = hit["stages"]["forward"]["p50_ms"]
        overhead = hit["overhead"]["p50_ms"]
        forward_cpu = hit["forward_cpu"]["p50_ms"]
        serving_cpu = hit["serving_cpu"]["p50_ms"]
        report["overhead_at_1000"][name] = {
            "overhead_ms": overhead, "forward_ms": forward, "ratio": overhead / forward,
            "serving_cpu_ms": serving_cpu, "forward_cpu_ms": forward_cpu,
            "cpu_ratio": serving_cpu / forward_cpu,
        }  # fmt: skip
    http_hit = report["http"]["hit/1000"]
    forward = http_hit["server_histograms"]["forward"]["p50_ms"]
    http_overhead = http_hit["client"]["p50_ms"] - forward
    report["http_overhead_at_1000"] = {
        "overhead_ms": http_overhead, "forward_ms": forward, "ratio": http_overhead / forward,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model-dir", type=Path, help="artefact root; default ./artifacts if it has LATEST"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--hits", type=int, default=300, help="cache-hit requests per M")
    parser.add_argument("--misses", type=int, default=40, help="cache-miss requests per M")
    parser.add_argument(
        "--item-requests", type=int, default=80, help="requests per share outside the item cache"
    )
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--parts", type=lambda text: set(text.split(",")), default={"latency", "cpu"},
        help="comma list of latency (in-process and HTTP breakdowns), cpu (CPU per request "
        "of the deployed service), featurize (the featurize stage per candidate), footprint "
        "(Redis bytes per user) and soak (Redis memory "
        "under load); default latency,cpu",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", metavar="REV",
        help="also measure this git revision's service (cpu, featurize, footprint), side by side",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-model-dir", type=Path, metavar="DIR",
        help="the artefact the --baseline revision serves (default: the same); export the same "
        "checkpoint with that revision's code when the exported programs changed",
    )  # fmt: skip
    parser.add_argument(
        "--outside-share", type=float, default=0.2,
        help="cpu: share of every candidate set that are ids outside the catalogue",
    )  # fmt: skip
    parser.add_argument(
        "--featurize-requests", type=int, default=300, help="featurize part: requests per mix"
    )
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="soak length")
    parser.add_argument("--soak-rate", type=float, default=60.0, help="soak requests per second")
    parser.add_argument("--cpu-rounds", type=int, default=3, help="alternating blocks per service")
    parser.add_argument("--cpu-seconds", type=float, default=10.0, help="seconds per route block")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])

    with tempfile.TemporaryDirectory(prefix="ifa-bench-") as scratch:
        model_dir = args.model_dir
        label = "trained artefact"
        if model_dir is None and (Path("artifacts") / "LATEST").is_file():
            model_dir = Path("artifacts")
        if model_dir is None:
            print("no artefact: exporting an untrained IFA (default spec, 100k items)", flush=True)
            model_dir = build_untrained_artifact(Path(scratch))
            label = "untrained IFA, default spec, synthetic 100k-item catalogue"
        if args.parts & {"footprint", "soak"}:
            print(footprint_parts(args, model_dir))
        if "featurize" in args.parts:
            print(featurize_part(args, model_dir, label))
        if not args.parts & {"latency", "cpu"}:
            return 0
        report = asyncio.run(run(args, model_dir, label))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "service_bench.md").write_text(text)
    print(text)
    return 0


def featurize_part(args: argparse.Namespace, model_dir: Path, label: str) -> str:
    """Run the featurize part; returns results/featurize_bench.md as written."""
    from service import featurize_bench

    print("featurize stage per candidate ...", flush=True)
    with ExitStack() as stack:
        roots = {"this tree": REPO_ROOT}
        if args.baseline is not None:
            roots = {args.baseline: stack.enter_context(checkout(args.baseline))} | roots
        trees = featurize_bench.featurize(model_dir, roots, args.featurize_requests)
    report = {
        "command": "python -m service.bench " + " ".join(args.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
        f"Python {platform.python_version()}",
        "model": label,
        "requests": args.featurize_requests,
        "trees": trees,
    }
    return featurize_bench.write(args.out, report)


def footprint_parts(args: argparse.Namespace, model_dir: Path) -> str:
    """Run the footprint and soak parts asked for; returns results/footprint.md as written."""
    from service import footprint

    parts: dict[str, Any] = {}
    with ExitStack() as stack:
        if "footprint" in args.parts:
            roots = {"this tree": REPO_ROOT}
            if args.baseline is not None:
                roots = {args.baseline: stack.enter_context(checkout(args.baseline))} | roots
            parts["footprint"] = footprint.footprint(model_dir, roots)
    if "soak" in args.parts:
        parts["soak"] = footprint.soak(model_dir, args.soak_seconds, args.soak_rate)
    command = "python -m service.bench " + " ".join(args.argv)
    return footprint.write(args.out, parts, command)


if __name__ == "__main__":
    raise SystemExit(main())
