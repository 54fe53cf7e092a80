"""Prometheus metrics of the service, in a registry of the app's own (tests build many apps).

Names and labels are a contract with the dashboards and alerts: change neither lightly. Labels are
bounded sets (route templates, status classes, stages, outcomes), never user or item ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set (by ``python -m service --workers N``) to the directory where every worker process
writes its samples; a scrape of any worker then reads all of them (prometheus-client's
multiprocess mode). Gauges say how their per-process values combine (``multiprocess_mode``)."""

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""Fine below 50 ms, where the p99 objective lies."""

STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""Stages are parts of a request: a decade finer at the bottom than the request histogram."""

METRICS_ROUTE = "/metrics"
"""Excluded from the latency histogram: scrapes are not traffic."""

CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 1500, 2000, 3000, 5000)

STAGES = (
    "validate", "featurize", "state_fetch", "model_queue", "fold", "encode", "forward",
    "serialise",
)  # fmt: skip
"""model_queue: a model job's wait for the worker's model thread (one observation per job)."""
CACHE_OUTCOMES = ("hit", "miss", "stale", "degraded")
UNKNOWN_ITEM_REASONS = ("unknown_id", "unknown_attribute")
ITEM_CACHE_OUTCOMES = ("hit", "miss", "degraded")
INGEST_OUTCOMES = ("accepted", "duplicate")
ERROR_KINDS = (
    "validation", "store", "model", "internal", "overloaded", "unauthorized", "forbidden",
    "too_large",
)  # fmt: skip
STATE_REPAIRS = ("undecodable", "non_finite", "cursor_beyond_log", "window_unreachable")
ROLLOUT_OUTCOMES = ("switched", "failed")
EXPLAIN_OUTCOMES = ("ok", "rate_limited")
STORE_OPERATIONS = (
    "snapshot", "read_events", "append_events", "put_state", "put_profile", "seed", "ping",
    "put_items", "get_items", "agree_layout",
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "ifa_http_requests_total",
            "HTTP requests served, by route template, method and status class.",
            ["route", "method", "status_class"],
            registry=r,
        )
        self.http_duration = Histogram(
            "ifa_http_request_duration_seconds",
            "HTTP request latency (the /metrics route excluded).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rank_stage = Histogram(
            "ifa_rank_stage_duration_seconds",
            "Time spent in each stage of a /rank request.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.state_cache = Counter(
            "ifa_state_cache_total",
            "User state lookups: hit, miss (encoded from the whole log), stale (events folded) or "
            "degraded (the store did not answer in time: a locally cached or empty state).",
            ["outcome"],
            registry=r,
        )
        self.rank_candidates = Histogram(
            "ifa_rank_candidates",
            "Candidates per /rank request.",
            buckets=CANDIDATE_BUCKETS,
            registry=r,
        )
        self.candidates = Counter("ifa_candidates_total", "Candidates scored.", registry=r)
        self.unknown_items = Counter(
            "ifa_unknown_items_total",
            "Candidates scored with out-of-vocabulary rows, by reason: unknown_id (in neither the "
            "model's catalogue nor the item table: every field OOV), unknown_attribute (a known "
            "item with an attribute outside the model's vocabulary: that field OOV).",
            ["reason"],
            registry=r,
        )
        self.item_cache = Counter(
            "ifa_item_cache_total",
            "Item feature lookups (candidates and folded events) by outcome: hit (this worker's "
            "cache), miss (fetched from the item table), degraded (the table did not answer in "
            "time: a cached, base-catalogue or OOV row).",
            ["outcome"],
            registry=r,
        )
        self.events_ingested = Counter(
            "ifa_events_ingested_total",
            "Behaviour events posted, by outcome (duplicates are retries by event id).",
            ["outcome"],
            registry=r,
        )
        self.errors = Counter(
            "ifa_errors_total",
            "Failed requests by kind: validation, store, model, internal, overloaded (503 with "
            "Retry-After: in-flight limit or budget spent), unauthorized (401: no bearer token), "
            "forbidden (403: a token not accepted), too_large (413).",
            ["kind"],
            registry=r,
        )
        self.store_duration = Histogram(
            "ifa_store_operation_duration_seconds",
            "Latency of store operations.",
            ["operation"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "ifa_store_errors_total", "Failed store operations.", ["operation"], registry=r
        )
        self.state_repairs = Counter(
            "ifa_state_repairs_total",
            "Cached states replaced because they were wrong: undecodable, non_finite, "
            "cursor_beyond_log (a truncated or restored log), window_unreachable (the events to "
            "fold out are gone).",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "ifa_inflight_requests",
            "Requests (/rank, /events) this worker is handling now; max_inflight caps it.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.write_backs_skipped = Counter(
            "ifa_state_write_backs_skipped_total",
            "State write-backs not started because too many were pending (a slow store).",
            registry=r,
        )
        self.model_info = Gauge(
            "ifa_model_info",
            "The model version served (value 1).",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_queue_depth = Gauge(
            "ifa_model_queue_depth",
            "Model jobs (encode, fold, score) submitted and not finished, summed over workers.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.event_loop_lag = Gauge(
            "ifa_event_loop_lag_seconds",
            "Largest event-loop lag over the last few seconds (how late a timer fired), the "
            "worst worker's.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollouts = Counter(
            "ifa_rollouts_total",
            "Model rollouts by outcome: switched (to a new version, or back) or failed (the old "
            "version still serves).",
            ["outcome"],
            registry=r,
        )
        self.rollout_warm_users = Gauge(
            "ifa_rollout_warm_users",
            "Warm-up of a rollout, summed over workers: users to warm (total) and warmed (done).",
            ["count"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.states_deleted = Counter(
            "ifa_states_deleted_total",
            "Cached states of older state versions deleted after a rollout.",
            registry=r,
        )
        self.explains = Counter(
            "ifa_explain_total",
            "POST /explain calls by outcome: ok, or rate_limited (429).",
            ["outcome"],
            registry=r,
        )
        # Pre-create the bounded label sets so that dashboards see zeros, not gaps.
        for stage in STAGES:
            self.rank_stage.labels(stage=stage)
        for outcome in CACHE_OUTCOMES:
            self.state_cache.labels(outcome=outcome)
        for reason in UNKNOWN_ITEM_REASONS:
            self.unknown_items.labels(reason=reason)
        for outcome in ITEM_CACHE_OUTCOMES:
            self.item_cache.labels(outcome=outcome)
        for outcome in INGEST_OUTCOMES:
            self.events_ingested.labels(outcome=outcome)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)
        for reason in STATE_REPAIRS:
            self.state_repairs.labels(reason=reason)
        for outcome in ROLLOUT_OUTCOMES:
            self.rollouts.labels(outcome=outcome)
        for count in ("total", "done"):
            self.rollout_warm_users.labels(count=count)
        for outcome in EXPLAIN_OUTCOMES:
            self.explains.labels(outcome=outcome)
        for operation in STORE_OPERATIONS:
            self.store_duration.labels(operation=operation)
            self.store_errors.labels(operation=operation)

        self._listeners: list[Callable[[str, float], None]] = []

    def add_listener(self, listener: Callable[[str, float], None]) -> None:
        """Also hand every stage timing, and every request's ("request", seconds), to
        ``listener``: the benchmark reads exact per-request figures this way, not buckets."""
        self._listeners.append(listener)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.rank_stage.labels(stage=stage).observe(seconds)
        self.notify(stage, seconds)

    def notify(self, name: str, seconds: float) -> None:
        """Hand a timing to the listeners only (no Prometheus series)."""
        for listener in self._listeners:
            listener(name, seconds)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(
            route=route, method=method, status_class=f"{status // 100}xx"
        ).inc()
        if route != METRICS_ROUTE:
            self.http_duration.labels(route=route, method=method).observe(seconds)
        self.notify("request", seconds)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text a scrape returns: ``registry``'s samples, or, in multiprocess mode, every live
    and finished worker's (counters and histograms summed, gauges by their mode)."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return generate_latest(registry)
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=directory)
    return generate_latest(merged)


def retire_worker() -> None:
    """Drop this worker's live gauges from the multiprocess directory (at shutdown)."""
    if os.environ.get(MULTIPROCESS_ENV):
        multiprocess.mark_process_dead(os.getpid())


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def retire_dead_workers() -> list[int]:
    """Drop the live gauges of worker processes that no longer run (killed, crashed: they never
    reached :func:`retire_worker`), so that their last in-flight count or queue depth does not
    stay in every scrape; each worker does it as it starts, which is when the server replaces
    one that died. Returns the process ids retired."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return []
    pids = {
        int(match.group(1))
        for path in Path(directory).glob("gauge_live*.db")
        if (match := _LIVE_GAUGE_FILE.fullmatch(path.name))
    }
    dead = sorted(pid for pid in pids if not _running(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return dead


def _running(pid: int) -> bool:
    """Whether a process with this id runs (and is not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not one of ours, but alive
    status = Path(f"/proc/{pid}/stat")
    try:
        # The state follows the command name in parentheses: Z is a zombie.
        return status.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
