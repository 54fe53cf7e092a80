"""Run Locust headless in a subprocess, summarise its CSVs and check latency/failure thresholds.

Locust is never imported here: gevent monkey-patches the process that imports it, which would
break torch, pytest and the capacity driver. The locustfile runs in its own interpreter.

    python -m loadtest --host http://127.0.0.1:8000 --users 20 --spawn-rate 20 --run-time 30s \\
        --csv-prefix results/loadtest/run --max-p99-ms 50 --max-failure-ratio 0.0

Exit status: 0 when every threshold holds (p99 of each request group, failure ratio, at least
one request), 1 when one is missed, 2 when Locust wrote no statistics at all (it crashed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loadtest.traffic import TrafficConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")

SMOKE_MAX_SECONDS = 30
EXIT_THRESHOLD_MISSED = 1
EXIT_NO_RESULTS = 2


@dataclass(frozen=True)
class LoadOptions:
    host: str
    users: int
    spawn_rate: float
    run_time_s: int
    csv_prefix: Path
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    reset_stats: bool = False
    """Drop what was measured while users were still spawning (capacity steps use this)."""
    processes: int = 1
    """Locust worker processes (``--processes``): one process's gevent loop saturates well below
    the rates a multi-worker service takes, and a saturated generator sends in bursts."""
    record_dir: Path | None = None
    """Where the locustfile writes every request (``IFA_LOADTEST_RECORD_DIR``); None: nowhere."""


@dataclass(frozen=True)
class GroupStats:
    """One request group (a Locust ``name``), or all of them as ``Aggregated``."""

    name: str
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Summary:
    groups: list[GroupStats]
    aggregated: GroupStats
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, object]:
        def group(g: GroupStats) -> dict[str, object]:
            # JSON has no NaN: a percentile of an empty group is null.
            values = asdict(g) | {"failure_ratio": g.failure_ratio}
            return {
                k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()
            }

        return {
            "passed": self.passed,
            "violations": self.violations,
            "aggregated": group(self.aggregated),
            "groups": [group(g) for g in self.groups],
        }


def parse_duration(text: str) -> int:
    """Seconds of a Locust-style duration: ``30``, ``30s``, ``2m``, ``1h30m``."""
    if text.isdigit():
        return int(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 30s, 2m)")
    hours, minutes, seconds = (int(g) if g else 0 for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def _number(raw: str) -> float:
    # Locust writes "N/A" for percentiles of a group with no requests.
    try:
        return float(raw)
    except ValueError:
        return math.nan


def read_stats(csv_prefix: Path) -> tuple[list[GroupStats], GroupStats]:
    """Per-group and aggregated statistics from Locust's ``<prefix>_stats.csv``."""
    path = Path(f"{csv_prefix}_stats.csv")
    groups: list[GroupStats] = []
    aggregated: GroupStats | None = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            stats = GroupStats(
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                requests_per_s=_number(row["Requests/s"]),
                p50_ms=_number(row["50%"]),
                p95_ms=_number(row["95%"]),
                p99_ms=_number(row["99%"]),
                max_ms=_number(row["Max Response Time"]),
            )
            if row["Name"] == "Aggregated":
                aggregated = stats
            else:
                groups.append(stats)
    if aggregated is None:
        raise ValueError(f"{path} has no Aggregated row")
    return groups, aggregated


def check(summary: Summary, max_p99_ms: float | None, max_failure_ratio: float | None) -> Summary:
    """The summary with a violation for each threshold it misses (p99 per request group)."""
    violations = []
    if summary.aggregated.requests == 0:
        violations.append("no request completed")
    if max_p99_ms is not None:
        for group in summary.groups:
            # NaN (no requests in the group) compares False, so it must be caught explicitly.
            if not group.p99_ms <= max_p99_ms:
                violations.append(f"{group.name} p99 {group.p99_ms:g} ms > {max_p99_ms:g} ms")
    ratio = summary.aggregated.failure_ratio
    if max_failure_ratio is not None and ratio > max_failure_ratio:
        violations.append(f"failure ratio {ratio:.4f} > {max_failure_ratio:g}")
    return replace(summary, violations=violations)


def run_locust(options: LoadOptions) -> Summary:
    """Run Locust headless for ``options.run_time_s`` and read back its statistics.

    Raises ``RuntimeError`` (with the tail of Locust's log) where it wrote no statistics.
    """
    options.csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(f"{options.csv_prefix}_locust.log")
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "--host", options.host,
        "--users", str(options.users),
        "--spawn-rate", str(options.spawn_rate),
        "--run-time", f"{options.run_time_s}s",
        "--stop-timeout", "5",
        "--csv", str(options.csv_prefix),
        "--only-summary",
        # Thresholds are ours to judge; Locust's own exit code would fail on any failure at all.
        "--exit-code-on-error", "0",
    ]  # fmt: skip
    if options.reset_stats:
        command.append("--reset-stats")
    if options.processes > 1:
        command += ["--processes", str(options.processes)]
    env = os.environ | options.traffic.to_env()
    if options.record_dir is not None:
        env["IFA_LOADTEST_RECORD_DIR"] = str(options.record_dir)
    # The locustfile imports loadtest.traffic, so the repository root must be importable.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with log_path.open("w") as log:
        # A session of its own: with --processes, Locust's forked workers can outlive the
        # master by a few seconds and keep sending, which would leak load into whatever is
        # measured next; the whole group is ended once the master is done.
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=options.run_time_s + 60)
        finally:
            end_process_group(process)
    try:
        groups, aggregated = read_stats(options.csv_prefix)
    except (OSError, ValueError) as error:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(
            f"Locust (exit {process.returncode}) wrote no statistics: {error}\n{tail}"
        ) from error
    return Summary(groups, aggregated)


def end_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM every process left in ``process``'s group, then SIGKILL what is still there."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    if process.poll() is None:
        process.wait(5)


def to_markdown(summary: Summary, options: LoadOptions) -> str:
    lines = [
        f"# Load test against {options.host}",
        "",
        f"{options.users} users × {options.traffic.user_rps:g} tasks/s each "
        f"({'closed loop' if options.traffic.user_rps <= 0 else 'Poisson arrivals'}), "
        f"{options.run_time_s} s, {options.traffic.candidates} candidates per /rank, "
        f"/rank:/events = {options.traffic.rank_weight}:{options.traffic.events_weight}.",
        "",
        "| request | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in [*summary.groups, summary.aggregated]:
        lines.append(
            f"| {g.name} | {g.requests} | {g.failures} | {g.requests_per_s:.1f} | {g.p50_ms:g} "
            f"| {g.p95_ms:g} | {g.p99_ms:g} | {g.max_ms:.0f} |"
        )
    lines += [
        "",
        "**PASSED**" if summary.passed else "**FAILED**: " + "; ".join(summary.violations),
    ]
    return "\n".join(lines) + "\n"


def write_summary(summary: Summary, options: LoadOptions) -> tuple[Path, Path]:
    json_path = Path(f"{options.csv_prefix}_summary.json")
    md_path = Path(f"{options.csv_prefix}_summary.md")
    report = {
        "host": options.host,
        "users": options.users,
        "spawn_rate": options.spawn_rate,
        "run_time_s": options.run_time_s,
        "traffic": {
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(options.traffic).items()
        },
    } | summary.to_dict()
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    md_path.write_text(to_markdown(summary, options))
    return json_path, md_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--users", type=int, help="simulated users (default 20; --smoke: 4)")
    parser.add_argument(
        "--spawn-rate", type=float, help="users started per second (default: all in 1 s)"
    )
    parser.add_argument(
        "--run-time", type=parse_duration, help="e.g. 30s, 2m (default 30s; --smoke: 15s)"
    )
    parser.add_argument(
        "--csv-prefix",
        type=Path,
        default=Path("results/loadtest/run"),
        help="Locust CSVs and the summary go to <prefix>_*.csv/.json/.md",
    )
    parser.add_argument(
        "--max-p99-ms", type=float, default=50.0, help="p99 bound of every request group"
    )
    parser.add_argument(
        "--max-failure-ratio", type=float, default=0.0, help="failed / all requests bound"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"short CI run: few users, at most {SMOKE_MAX_SECONDS} s",
    )
    parser.add_argument(
        "--reset-stats", action="store_true", help="measure only after spawning ends"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="Locust worker processes; use one per spare core above ~50 req/s",
    )
    defaults = TrafficConfig.from_env()
    traffic = parser.add_argument_group(
        "traffic (defaults from IFA_LOADTEST_* environment variables)"
    )
    traffic.add_argument(
        "--world", type=Path, default=defaults.world, help="world with users/items.parquet"
    )
    traffic.add_argument(
        "--candidates", type=int, default=defaults.candidates, help="candidates per /rank"
    )
    traffic.add_argument("--k", type=int, default=defaults.k, help="items asked back per /rank")
    traffic.add_argument("--rank-weight", type=int, default=defaults.rank_weight)
    traffic.add_argument("--events-weight", type=int, default=defaults.events_weight)
    traffic.add_argument(
        "--user-rps",
        type=float,
        default=defaults.user_rps,
        help="tasks/s per user; 0 = closed loop without waiting",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> LoadOptions:
    users = args.users if args.users is not None else (4 if args.smoke else 20)
    run_time = args.run_time if args.run_time is not None else (15 if args.smoke else 30)
    if args.smoke:
        run_time = min(run_time, SMOKE_MAX_SECONDS)
    traffic = replace(
        TrafficConfig.from_env(),
        # Locust runs from the repository root: paths must not depend on the caller's directory.
        world=args.world.resolve(),
        candidates=args.candidates,
        k=args.k,
        rank_weight=args.rank_weight,
        events_weight=args.events_weight,
        user_rps=args.user_rps,
    )
    return LoadOptions(
        host=args.host,
        users=users,
        spawn_rate=args.spawn_rate if args.spawn_rate is not None else users,
        run_time_s=run_time,
        csv_prefix=args.csv_prefix.resolve(),
        traffic=traffic,
        reset_stats=args.reset_stats,
        processes=args.processes,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    try:
        summary = run_locust(options)
    except RuntimeError as error:
        print(f"load test produced no results: {error}", file=sys.stderr)
        return EXIT_NO_RESULTS
    summary = check(summary, args.max_p99_ms, args.max_failure_ratio)
    json_path, md_path = write_summary(summary, options)
    print(to_markdown(summary, options), end="")
    print(f"CSVs: {options.csv_prefix}_*.csv; summary: {json_path}, {md_path}")
    return 0 if summary.passed else EXIT_THRESHOLD_MISSED
