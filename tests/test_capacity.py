"""The capacity tool's inputs and bookkeeping: candidate sets with an exact share outside the
model's catalogue, the live pool registered on a real service, the order of curves and their
summary over rounds, and the checkout a baseline revision's service runs from."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from loadtest.capacity import (
    CONFIGS,
    Curve,
    OpenLoopStep,
    ServerView,
    Tree,
    catalogue_file,
    curve_order,
    live_items,
    summarise,
    to_markdown,
)
from loadtest.harness import (
    REPO_ROOT,
    checkout,
    post_json,
    put_items,
    running_service,
    warm_state_cache,
)
from loadtest.openloop import ArrivalCheck
from loadtest.traffic import Traffic, TrafficConfig
from tests.support import CATALOGUE_ITEMS

# -- candidate sets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "live", "unknown"),
    [
        (TrafficConfig(), 0, 10),  # the default: 1 % ids nobody knows, no live pool
        (TrafficConfig(outside_share=0.0), 0, 0),
        (TrafficConfig(outside_share=0.2, live_pool=2000), 100, 100),
        (TrafficConfig(outside_share=0.123, live_pool=2000), 61, 62),
        (TrafficConfig(outside_share=1.0, live_pool=600, unknown_pool=600), 500, 500),
    ],
)
def test_candidate_sets_hold_exactly_the_outside_share(
    config: TrafficConfig, live: int, unknown: int
) -> None:
    items = list(range(0, 20_000, 2))  # gaps: the pools must avoid ids between catalogue ones
    traffic = Traffic(config, range(50), items)
    catalogue, live_pool, unknown_pool = set(items), set(traffic.live_ids), set(traffic.unknown_ids)
    assert len(live_pool) == config.live_pool and len(unknown_pool) == config.unknown_pool
    assert not catalogue & live_pool and not catalogue & unknown_pool
    assert not live_pool & unknown_pool

    seen: collections.Counter[int] = collections.Counter()
    for _ in range(100):
        candidates = traffic.rank_body()["candidate_ids"]
        assert len(candidates) == config.candidates
        assert len(set(candidates)) == len(candidates), "candidates must be unique (DESIGN §5)"
        assert sum(i in live_pool for i in candidates) == live
        assert sum(i in unknown_pool for i in candidates) == unknown
        assert sum(i in catalogue for i in candidates) == config.candidates - live - unknown
        seen.update(i for i in candidates if i not in catalogue)
    # The pools recur across requests, as new items do on a feed (fresh ids never would).
    if live + unknown:
        assert seen.most_common(1)[0][1] > 1
        assert len(seen) <= config.live_pool + config.unknown_pool


def test_the_same_config_draws_from_the_same_pools() -> None:
    """Locust's processes build their own Traffic: they must draw the ids the tool registered."""
    config = TrafficConfig(outside_share=0.2, live_pool=300, unknown_pool=300)
    first, second = Traffic(config, [1], range(1000)), Traffic(config, [1], range(1000))
    assert first.live_ids == second.live_ids and first.unknown_ids == second.unknown_ids
    assert TrafficConfig.from_env(config.to_env()) == config


@pytest.mark.parametrize(
    "config",
    [
        TrafficConfig(outside_share=0.2, live_pool=50),  # 100 live a request from 50 ids
        TrafficConfig(outside_share=0.2, unknown_pool=150),  # 200 unknown a request
        TrafficConfig(outside_share=1.5),
    ],
)
def test_pools_too_small_or_shares_out_of_range_are_refused(config: TrafficConfig) -> None:
    with pytest.raises(ValueError):
        Traffic(config, [1], range(2000))


def test_live_items_take_attribute_values_of_the_catalogue(artifact_dir: Path) -> None:
    _, path = catalogue_file(artifact_dir)
    table = pq.read_table(path)
    ids = list(range(5000, 5400))
    items = live_items(artifact_dir, ids, seed=0)
    assert list(items) == ids
    for name in (n for n in table.column_names if n != "item_id"):
        values = {attributes[name] for attributes in items.values()}
        assert values <= set(table.column(name).to_pylist())
        assert len(values) > 1, f"{name}: every live item got the same value"


# -- the live pool on a real service -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.redis
def test_the_live_pool_is_registered_and_ranked_as_known(
    artifact_dir: Path, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    config = TrafficConfig(candidates=200, outside_share=0.2, live_pool=300, unknown_pool=300)
    traffic = Traffic(config, range(5), range(CATALOGUE_ITEMS))
    # One worker: the first /rank leaves negative entries for the live ids in its worker's item
    # cache, which another worker's PUT would only replace after the cache TTL (the documented
    # staleness between workers); the capacity tool registers its pool before any /rank.
    env = {
        "IFA_STORE": "redis",
        "IFA_REDIS_URL": redis_url,
        "IFA_REDIS_PREFIX": redis_prefix,
        "IFA_WORKERS": "1",
    }
    with running_service(artifact_dir, tmp_path / "service.log", env) as service:
        body = traffic.rank_body()
        before = post_json(f"{service.url}/rank", body)
        assert isinstance(before, dict)
        assert before["unknown_items"] == 40, "nothing registered yet: every outside id unknown"

        live = live_items(artifact_dir, traffic.live_ids, seed=0)
        assert put_items(service.url, live, batch=128) == 300  # three PUTs
        # The warm-up ranks with the load's own mix; then only the unknown pool is unknown.
        warm_state_cache(service.url, range(5), traffic.candidate_ids)
        for _ in range(3):
            answer = post_json(f"{service.url}/rank", traffic.rank_body())
            assert isinstance(answer, dict)
            assert answer["unknown_items"] == traffic.unknown_per_request == 20
            assert len(answer["items"]) == config.k


# -- curves, rounds and the report ---------------------------------------------------------------


def test_rounds_alternate_which_tree_goes_first() -> None:
    this, other = (
        Tree(REPO_ROOT, Path("artifacts")),
        Tree(Path("/checkout"), Path("artifacts"), "HEAD~1"),
    )
    configs = [CONFIGS["baseline"], CONFIGS["defaults"]]
    order = [(r, c.name, t.revision) for r, c, t in curve_order(configs, [this, other], 3)]
    assert order == [
        (0, "baseline", None), (0, "baseline", "HEAD~1"),
        (0, "defaults", None), (0, "defaults", "HEAD~1"),
        (1, "baseline", "HEAD~1"), (1, "baseline", None),
        (1, "defaults", "HEAD~1"), (1, "defaults", None),
        (2, "baseline", None), (2, "baseline", "HEAD~1"),
        (2, "defaults", None), (2, "defaults", "HEAD~1"),
    ]  # fmt: skip


def step(rate: float, rank_p99_ms: float) -> OpenLoopStep:
    return OpenLoopStep(
        offered_rps=rate, achieved_rps=rate, requests=100, failures=0, failure_kinds={},
        rank_p50_ms=rank_p99_ms / 3, rank_p99_ms=rank_p99_ms, rank_p999_ms=rank_p99_ms,
        events_p99_ms=5.0, generator_lag_p99_ms=0.5, generator_cpu_percent=10.0, connections=4,
        arrivals=ArrivalCheck(arrivals=100, intended_max=3, observed_max=3, poisson_q999=5.0),
        server=ServerView(10.0, 30.0, {"hit": 80}, {}, 150.0, 5.0, 0.1), load_average=1.0,
    )  # fmt: skip


def curve(revision: str | None, round_: int, p99_by_rate: dict[float, float]) -> Curve:
    steps = [step(rate, p99) for rate, p99 in p99_by_rate.items()]
    return Curve(CONFIGS["defaults"], revision, round_, steps, [])


def test_summary_gives_each_round_the_medians_and_the_ratios() -> None:
    curves = [
        curve(None, 0, {200: 20, 300: 40, 350: 60}),  # 300
        curve("HEAD~1", 0, {200: 45, 300: 90}),  # 200
        curve("HEAD~1", 1, {200: 30, 300: 70}),  # 200
        curve(None, 1, {200: 20, 250: 30, 300: 55}),  # 250
        curve(None, 2, {200: 20, 350: 45}),  # 350
        curve("HEAD~1", 2, {200: 60}),  # none passed
    ]
    summary = summarise(curves, "HEAD~1")
    assert summary["rounds"] == 3
    assert summary["capacity_rps"] == {
        "defaults": [300, 250, 350],
        "defaults@HEAD~1": [200, 200, 0],
    }
    assert summary["median_rps"] == {"defaults": 300, "defaults@HEAD~1": 200}
    ratio = summary["ratio_to_revision"]["defaults"]
    assert ratio["per_round"] == [1.5, 1.25, None]
    assert ratio["median"] == pytest.approx(1.375) and ratio["of_medians"] == 1.5

    machine = {"cpus": 2, "processor": "x86_64", "python": "3.11", "torch": "2",
               "load_average_at_start": 0.5}  # fmt: skip
    setup = {
        "command": "python -m loadtest.capacity --baseline HEAD~1 --repeats 3",
        "model_version": "ifa-x", "tree_commit": "abc", "baseline_revision": "HEAD~1",
        "baseline_commit": "def", "users": 100, "events_per_user": 10_000, "candidates": 1000,
        "outside_share": 0.2, "live_pool": 2000, "unknown_pool": 2000, "step_seconds": 20,
    }  # fmt: skip
    report = {"setup": setup, "summary": summary, "machine": machine, "date": "today",
              "duration_s": 1, "plot": "capacity.png"}  # fmt: skip
    text = to_markdown(report, curves)
    assert "| defaults | 300 | 250 | 350 | 300 |" in text
    assert "| defaults@HEAD~1 | 200 | 200 | none passed | 200 |" in text
    assert "| defaults | 1.50× | 1.25× |  | 1.38× | 1.50× |" in text
    assert "20 % are outside the model's catalogue" in text
    assert text.count("## defaults@HEAD~1, round") == 3


# -- the baseline revision's tree ----------------------------------------------------------------


def test_checkout_holds_the_revision_and_its_code_runs_first() -> None:
    shown = subprocess.run(
        ["git", "show", "HEAD:loadtest/harness.py"], cwd=REPO_ROOT, check=True, capture_output=True
    ).stdout
    with checkout("HEAD") as root:
        assert (root / "loadtest" / "harness.py").read_bytes() == shown
        assert (root / "service" / "__main__.py").is_file()
        # running_service starts `python -m service` with the checkout as working directory, so
        # the checkout's modules come first, not this tree's (installed into the venv).
        imported = subprocess.run(
            [sys.executable, "-c", "import service; print(service.__file__)"],
            cwd=root, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        assert Path(imported).resolve().is_relative_to(root.resolve())
    assert not root.exists()
