"""A hot model rollout under load: Locust traffic while two new versions are published.

    python -m loadtest.rollout [--model-dir artifacts] [--world data/worlds/small-0]
        [--users 10] [--user-rps 2] [--phase-seconds 40] [--out results/rollout]

On this machine, all traffic to 127.0.0.1:

1. the served artefact is copied into a fresh export root, and two variants of its checkpoint
   are exported beside it (TorchScript, LATEST untouched): a *fusion-only* change (same encoder,
   so the same state version) and an *encoder* change (the key projection scaled by 1.01, a
   stand-in for a retrained encoder: a new state version);
2. ``python -m service --workers 2`` starts on a private ``redis-server`` seeded with the world,
   polling LATEST every second, and every user is ranked once (the state cache is warm);
3. Locust (``loadtest/locustfile.py`` as shipped, recording every request) runs a 4:1
   /rank:/events mix; after ``--phase-seconds`` LATEST is pointed at the fusion variant, after
   another phase at the encoder variant, and the run goes on a phase past the last switch.
   /metrics is scraped twice a second for the warm-up gauges and the versions served.

Reported: failed requests (must be 0), /rank p99 before the first publication against p99
while each new version loads and warms (target ≤ 1.5×), the versions the responses named, and
the state cache hit rate over time (hit or stale against all /rank; a miss encodes a whole
history): no dip after the fusion change, the recovery time after the encoder change. Writes
``<out>.md`` and ``<out>.json``; the service log, Locust's CSVs and the request records go to
``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from loadtest.capacity import (
    describe_machine,
    finite,
    machine,
    percentile_ms,
    scrape,
    table_row,
)
from loadtest.harness import REPO_ROOT, redis_server, running_service, warm_state_cache
from loadtest.runner import LoadOptions, run_locust
from loadtest.traffic import TrafficConfig
from model.artifact import CHECKPOINT_FILE, load_catalogue, load_manifest, resolve_artifact_dir
from model.checkpoint import load_checkpoint
from model.export import export_artifact, write_latest

FUSION_VARIANT = {"click": 1.0, "like": 0.5}
ENCODER_SCALE = 1.01
BIN_SECONDS = 5.0
P99_TARGET_RATIO = 1.5
RAMP_SECONDS = 10.0
"""Left out of the baseline: Locust spawning users, connections opening."""


@dataclass(frozen=True)
class Versions:
    original: str
    fusion: str
    encoder: str
    state_versions: dict[str, str]


def prepare_versions(model_dir: Path, root: Path) -> Versions:
    """The served version copied into ``root`` (LATEST names it) and the two variants."""
    source = resolve_artifact_dir(model_dir)
    original = load_manifest(source)
    shutil.copytree(source, root / source.name)
    write_latest(root, source.name)
    catalogue = load_catalogue(source)
    checkpoint = load_checkpoint(source / CHECKPOINT_FILE)
    formats = ("torchscript",)
    fusion_dir = export_artifact(
        checkpoint, catalogue, root, fusion=FUSION_VARIANT, formats=formats, update_latest=False
    )
    with torch.no_grad():
        key = checkpoint.net.get_submodule("encoder.key")
        assert isinstance(key, torch.nn.Linear)
        key.weight.mul_(ENCODER_SCALE)
    encoder_dir = export_artifact(
        checkpoint, catalogue, root, fusion=original.fusion, formats=formats, update_latest=False
    )
    names = [source.name, fusion_dir.name, encoder_dir.name]
    states = {name: str(load_manifest(root / name).state_version) for name in names}
    return Versions(names[0], names[1], names[2], state_versions=states)


class MetricsSampler:
    """/metrics twice a second: rollout warm-up gauges and the versions workers serve."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                samples = scrape(self.url)
            except OSError:
                samples = {}
            warm = {
                dict(labels)["count"]: value
                for (name, labels), value in samples.items()
                if name == "ifa_rollout_warm_users"
            }
            serving = sorted(
                dict(labels)["version"]
                for (name, labels), value in samples.items()
                if name == "ifa_model_info" and value == 1
            )
            self.samples.append(
                {
                    "time": time.time(),
                    "warm_total": warm.get("total", 0.0),
                    "warm_done": warm.get("done", 0.0),
                    "serving": serving,
                }
            )
            self._stop.wait(0.5)

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def read_records(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(directory.glob("requests-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return sorted(records, key=lambda r: r["start"])


def cache_ratio(ranks: Sequence[dict[str, Any]]) -> float:
    """Share of /rank answered from a cached state (hit, or stale: events folded in)."""
    if not ranks:
        return math.nan
    return sum(r.get("state_cache") in ("hit", "stale") for r in ranks) / len(ranks)


def window(ranks: Sequence[dict[str, Any]], start: float, stop: float) -> list[dict[str, Any]]:
    return [r for r in ranks if start <= r["start"] < stop]


def latencies(ranks: Sequence[dict[str, Any]]) -> list[float]:
    return [r["end"] - r["start"] for r in ranks]


def switch_window(
    ranks: Sequence[dict[str, Any]], published: float, old: str, new: str
) -> tuple[float, float]:
    """When the last request answered by ``old`` started (every worker had switched by then)
    and when the first answered by ``new`` did."""
    after = [r for r in ranks if r["start"] >= published]
    last_old = max((r["start"] for r in after if r.get("model_version") == old), default=published)
    first_new = min((r["start"] for r in after if r.get("model_version") == new), default=math.nan)
    return last_old, first_new


def recovery_seconds(
    bins: Sequence[dict[str, Any]], t0: float, switched: float, threshold: float
) -> float:
    """Seconds from ``switched`` to the end of the last 5 s bin of the dip that starts at the
    switch (bins whose cache ratio is below ``threshold``); 0 when there is no dip."""
    recovered = switched
    for b in bins:
        start = t0 + b["t"]
        if start + BIN_SECONDS <= switched or not b["ranks"]:
            continue
        if b["cache_ratio"] >= threshold:
            break
        recovered = start + BIN_SECONDS
    return round(recovered - switched, 1)


def analyse(
    records: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    versions: Versions,
    published: dict[str, float],
) -> dict[str, Any]:
    t0 = records[0]["start"]
    end = max(r["end"] for r in records)
    ranks = [r for r in records if r["route"] == "/rank" and r["status"] == 200]
    failed = [r for r in records if r["status"] not in (200, 202)]
    baseline = window(ranks, t0 + RAMP_SECONDS, published["fusion"])
    fusion_done, fusion_first = switch_window(
        ranks, published["fusion"], versions.original, versions.fusion
    )
    encoder_done, encoder_first = switch_window(
        ranks, published["encoder"], versions.fusion, versions.encoder
    )
    warm_samples = [s for s in samples if s["time"] >= published["encoder"] and s["warm_total"]]
    warm_end = next(
        (s["time"] for s in warm_samples if s["warm_done"] >= s["warm_total"]), encoder_done
    )
    during_fusion = window(ranks, published["fusion"], fusion_done)
    during_warm = window(ranks, published["encoder"], encoder_done)
    p99_before = percentile_ms(latencies(baseline), 99)
    p99_fusion = percentile_ms(latencies(during_fusion), 99)
    p99_warm = percentile_ms(latencies(during_warm), 99)
    after_encoder = window(ranks, encoder_done, end)

    bins = []
    for start in np.arange(t0, end, BIN_SECONDS):
        part = window(ranks, float(start), float(start) + BIN_SECONDS)
        bins.append(
            {
                "t": round(float(start) - t0, 1),
                "ranks": len(part),
                "cache_ratio": cache_ratio(part),
                "miss_ratio": (
                    sum(r.get("state_cache") == "miss" for r in part) / len(part) if part else None
                ),
                "p99_ms": percentile_ms(latencies(part), 99),
                "versions": dict(Counter(r.get("model_version") for r in part)),
            }
        )
    steady = cache_ratio(baseline)
    baseline_bins = [
        b["p99_ms"]
        for b in bins
        if t0 + RAMP_SECONDS <= t0 + b["t"] and t0 + b["t"] + BIN_SECONDS <= published["fusion"]
    ]
    after_fusion = window(ranks, fusion_done, fusion_done + 20)
    before_fusion = window(ranks, published["fusion"] - 20, published["fusion"])
    fusion_bins = [b for b in bins if fusion_done <= t0 + b["t"] < published["encoder"]]
    recovery = recovery_seconds(bins, t0, encoder_first, steady - 0.02)
    after_switch = [b for b in bins if t0 + b["t"] + BIN_SECONDS > encoder_first and b["ranks"]]
    return {
        "requests": len(records),
        "rank_answers": len(ranks),
        "failed": len(failed),
        "failed_examples": failed[:5],
        "versions_seen": dict(Counter(r.get("model_version") for r in ranks)),
        "answers_without_one_version": sum(
            not isinstance(r.get("model_version"), str) for r in ranks
        ),
        "published_at_s": {k: round(v - t0, 1) for k, v in published.items()},
        "fusion": {
            "first_answer_s": round(fusion_first - t0, 1),
            "all_workers_switched_s": round(fusion_done - t0, 1),
            "p99_ms_during_load": p99_fusion,
            "cache_ratio_20s_before": cache_ratio(before_fusion),
            "cache_ratio_20s_after": cache_ratio(after_fusion),
            "lowest_cache_ratio_after": min(
                (b["cache_ratio"] for b in fusion_bins if b["ranks"]), default=math.nan
            ),
            "misses_after": sum(
                r.get("state_cache") == "miss"
                for r in window(ranks, fusion_done, published["encoder"])
            ),
        },
        "encoder": {
            "first_answer_s": round(encoder_first - t0, 1),
            "all_workers_switched_s": round(encoder_done - t0, 1),
            "warm_checks_all_workers": max((s["warm_total"] for s in warm_samples), default=0.0),
            "warm_up_seconds": round(warm_end - published["encoder"], 1),
            "p99_ms_during_load_and_warm_up": p99_warm,
            "cache_ratio_recovered_s_after_switch": recovery,
            "lowest_cache_ratio_after": min(
                (b["cache_ratio"] for b in after_switch), default=math.nan
            ),
        },
        "p99_ms_before": p99_before,
        "p99_ms_before_5s_bins": {
            "min": min(baseline_bins, default=math.nan),
            "median": float(np.median(baseline_bins)) if baseline_bins else math.nan,
            "max": max(baseline_bins, default=math.nan),
        },
        "p99_ms_after_encoder_switch": percentile_ms(latencies(after_encoder), 99),
        "p99_ratio_fusion": p99_fusion / p99_before,
        "p99_ratio_warm_up": p99_warm / p99_before,
        "steady_cache_ratio": steady,
        "bins": bins,
    }


def to_markdown(report: dict[str, Any]) -> str:
    a = report["analysis"]
    fusion, encoder = a["fusion"], a["encoder"]
    v = report["versions"]
    named = a["versions_seen"].items()
    noise = a["p99_ms_before_5s_bins"]
    ok = a["failed"] == 0 and a["p99_ratio_warm_up"] <= P99_TARGET_RATIO
    lines = [
        "# Hot model rollout under load",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {describe_machine(report['machine'])}; the machine's 2 cores are shared with "
        "other jobs (a niced model training among them), and this run itself was niced: absolute "
        "latencies are this machine's on a busy day, the ratios are the result.",
        "",
        f"Traffic: Locust, {report['locust']['users']} users × {report['locust']['user_rps']} "
        f"tasks/s (Poisson), /rank:/events 4:1, {report['locust']['candidates']} candidates per "
        f"/rank, over the {report['world_users']} users of `{report['world']}`; "
        f"`python -m service --workers 2` on a private Redis, LATEST polled every second.",
        "",
        f"Versions: {v['original']} (served at start) → {v['fusion']} (fusion "
        f"{FUSION_VARIANT}, same state version {v['state_versions'][v['fusion']]}) → "
        f"{v['encoder']} (key projection × {ENCODER_SCALE}: state version "
        f"{v['state_versions'][v['encoder']]}).",
        "",
        "| | value | target |",
        "|---|---|---|",
        table_row(["requests (all routes)", a["requests"], ""]),
        table_row(["failed requests", a["failed"], "0"]),
        table_row(
            ["/rank answers naming exactly one version", a["rank_answers"] - a[
                "answers_without_one_version"], f"all {a['rank_answers']}"]
        ),
        table_row(["versions named", ", ".join(f"{k}: {n}" for k, n in named), ""]),
        table_row(["/rank p99 before (ms)", f"{a['p99_ms_before']:.1f}", ""]),
        table_row(
            ["/rank p99 of the 5 s bins before: min / median / max (ms), the machine's noise",
             f"{noise['min']:.1f} / {noise['median']:.1f} / {noise['max']:.1f}", ""]
        ),
        table_row(
            ["/rank p99 while the fusion version loads (ms)",
             f"{fusion['p99_ms_during_load']:.1f} ({a['p99_ratio_fusion']:.2f}×)", "≤ 1.5×"]
        ),
        table_row(
            ["/rank p99 while the encoder version loads and warms (ms)",
             f"{encoder['p99_ms_during_load_and_warm_up']:.1f} ({a['p99_ratio_warm_up']:.2f}×)",
             "≤ 1.5×"]
        ),
        table_row(
            ["/rank p99 after the encoder switch, to the end (ms)",
             f"{a['p99_ms_after_encoder_switch']:.1f}", ""]
        ),
        table_row(["steady cache ratio (hit or stale) before", f"{a['steady_cache_ratio']:.3f}",
                   ""]),
        table_row(
            ["fusion change: cache ratio 20 s before / after the switch",
             f"{fusion['cache_ratio_20s_before']:.3f} / {fusion['cache_ratio_20s_after']:.3f}",
             "no dip"]
        ),
        table_row(
            ["fusion change: lowest 5 s cache ratio after the switch; misses after",
             f"{fusion['lowest_cache_ratio_after']:.3f}; {fusion['misses_after']}", ""]
        ),
        table_row(
            ["encoder change: users to warm, summed over the workers (each checks every active "
             "user, encodes those no other worker stored yet); warm-up time (s)",
             f"{encoder['warm_checks_all_workers']:.0f}; {encoder['warm_up_seconds']}", ""]
        ),
        table_row(
            ["encoder change: lowest 5 s cache ratio after the switch",
             f"{encoder['lowest_cache_ratio_after']:.3f}", ""]
        ),
        table_row(
            ["encoder change: time until the cache ratio is within 2 points of steady again "
             "(s, 5 s bins; 0: no dip)",
             encoder["cache_ratio_recovered_s_after_switch"], "stated"]
        ),
        "",
        f"Timeline (seconds from the first request): fusion published at "
        f"{a['published_at_s']['fusion']}, first answered at {fusion['first_answer_s']}, every "
        f"worker switched by {fusion['all_workers_switched_s']}; encoder published at "
        f"{a['published_at_s']['encoder']}, first answered at {encoder['first_answer_s']}, every "
        f"worker switched by {encoder['all_workers_switched_s']}.",
        "",
        "Result: " + (
            "zero failed requests and the p99 during the warm-up within 1.5× of before."
            if ok else "a target was missed (see the table); the run is reported as measured."
        ),
        "",
        "## Over time (5 s bins)",
        "",
        "| t (s) | /rank answers | cache ratio | miss ratio | p99 (ms) | versions |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for b in a["bins"]:
        if not b["ranks"]:
            continue
        versions = ", ".join(f"{k[-12:]}: {n}" for k, n in b["versions"].items())
        lines.append(
            table_row(
                [
                    b["t"],
                    b["ranks"],
                    f"{b['cache_ratio']:.3f}",
                    f"{b['miss_ratio']:.3f}",
                    f"{b['p99_ms']:.1f}",
                    versions,
                ]
            )
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.rollout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "artifacts")
    parser.add_argument("--world", type=Path, default=REPO_ROOT / "data" / "worlds" / "small-0")
    parser.add_argument("--users", type=int, default=10, help="Locust users")
    parser.add_argument("--user-rps", type=float, default=2.0, help="tasks per second per user")
    parser.add_argument("--candidates", type=int, default=1000, help="candidates per /rank")
    parser.add_argument("--phase-seconds", type=int, default=40)
    parser.add_argument(
        "--warm-budget-seconds", type=int, default=150, help="time allowed for the warm-up"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "rollout")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "rollout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    facts = machine()
    versions = prepare_versions(args.model_dir, work / "models")
    print(f"versions: {versions}", flush=True)
    phase = args.phase_seconds
    run_seconds = 3 * phase + args.warm_budget_seconds
    with redis_server(work / "redis") as redis_url:
        env = {
            "IFA_STORE": "redis",
            "IFA_REDIS_URL": redis_url,
            "IFA_SEED_WORLD": str(args.world),
            "IFA_PROGRAM_FORMAT": "torchscript",
            "IFA_MODEL_POLL_SECONDS": "1",
            "IFA_ROLLOUT_CLEANUP_DELAY_SECONDS": "30",
            "PROMETHEUS_MULTIPROC_DIR": str(work / "metrics"),
        }
        (work / "metrics").mkdir()
        with running_service(
            work / "models", work / "service.log", env=env, args=["--workers", "2"]
        ) as service:
            world_users = pq.read_table(args.world / "users.parquet", columns=["user_id"]).num_rows
            print("warming the state cache", flush=True)
            warm_state_cache(service.url, range(world_users), range(10))
            options = LoadOptions(
                host=service.url,
                users=args.users,
                spawn_rate=args.users,
                run_time_s=run_seconds,
                csv_prefix=work / "locust" / "run",
                traffic=TrafficConfig(
                    world=args.world, candidates=args.candidates, user_rps=args.user_rps
                ),
                record_dir=work / "records",
            )
            (work / "records").mkdir()
            published: dict[str, float] = {}
            with MetricsSampler(service.url) as sampler:
                locust = threading.Thread(target=run_locust, args=(options,), daemon=True)
                started = time.time()
                locust.start()
                time.sleep(phase)
                published["fusion"] = time.time()
                write_latest(work / "models", versions.fusion)
                print("published the fusion version", flush=True)
                time.sleep(phase)
                published["encoder"] = time.time()
                write_latest(work / "models", versions.encoder)
                print("published the encoder version", flush=True)
                locust.join(run_seconds + 120)
            print(f"traffic done after {time.time() - started:.0f} s", flush=True)
    (work / "timeline.json").write_text(
        json.dumps({"published": published, "samples": sampler.samples}) + "\n"
    )
    records = read_records(work / "records")
    analysis = analyse(records, sampler.samples, versions, published)
    report = {
        "command": " ".join(["python -m loadtest.rollout", *(argv or sys.argv[1:])]),
        "machine": facts,
        "world": str(args.world.relative_to(REPO_ROOT) if args.world.is_relative_to(REPO_ROOT)
                     else args.world),
        "world_users": world_users,
        "locust": {"users": args.users, "user_rps": args.user_rps, "candidates": args.candidates},
        "versions": {
            "original": versions.original,
            "fusion": versions.fusion,
            "encoder": versions.encoder,
            "state_versions": versions.state_versions,
        },
        "analysis": analysis,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(finite(report), indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0 if analysis["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
