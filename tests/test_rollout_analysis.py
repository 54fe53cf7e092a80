"""loadtest.rollout's reading of a run: switch times, failures, cache ratio and its recovery,
p99 windows, from request records like the locustfile writes."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.rollout import Versions, analyse, to_markdown

VERSIONS = Versions("v1", "v2", "v3", {"v1": "s1", "v2": "s1", "v3": "s2"})


def rank(start: float, seconds: float, version: str, cache: str = "hit") -> dict[str, Any]:
    return {
        "route": "/rank",
        "start": start,
        "end": start + seconds,
        "status": 200,
        "state_cache": cache,
        "model_version": version,
    }


def run() -> list[dict[str, Any]]:
    """20 /rank a second for 90 s: v1 until 30 s, v2 until 60 s, then v3, whose first 10 s
    miss half the time; one /events fails with a 503 at 50 s."""
    records = []
    for i in range(90 * 20):
        t = 1000.0 + i / 20
        if t < 1030.5:
            version = "v1"
        elif t < 1061.0:
            version = "v2"
        else:
            version = "v3"
        cache = "miss" if version == "v3" and t < 1071.0 and i % 2 else "hit"
        slow = 0.040 if 1045.0 <= t < 1061.0 else 0.010  # the encoder version loading
        records.append(rank(t, slow, version, cache))
    records.append({"route": "/events", "start": 1050.0, "end": 1050.1, "status": 503})
    return records


def test_analysis_of_a_run() -> None:
    published = {"fusion": 1030.0, "encoder": 1045.0}
    samples = [
        {"time": 1046.0, "warm_total": 100.0, "warm_done": 10.0, "serving": ["v2"]},
        {"time": 1058.0, "warm_total": 100.0, "warm_done": 100.0, "serving": ["v2"]},
    ]
    report = analyse(run(), samples, VERSIONS, published)
    assert report["failed"] == 1
    assert report["versions_seen"] == {"v1": 610, "v2": 610, "v3": 580}
    assert report["fusion"]["first_answer_s"] == 30.5
    assert report["fusion"]["misses_after"] == 0
    assert report["fusion"]["cache_ratio_20s_after"] == 1.0
    assert report["encoder"]["first_answer_s"] == 61.0
    assert report["encoder"]["warm_up_seconds"] == 13.0
    assert report["p99_ms_before"] == pytest.approx(10.0)
    assert report["p99_ratio_warm_up"] == pytest.approx(4.0)
    # Misses until 71 s: bins [60, 65) to [70, 75) are below steady; [75, 80) is back, 14 s
    # after the first answer of v3 (5 s resolution).
    assert report["encoder"]["cache_ratio_recovered_s_after_switch"] == 14.0
    assert report["encoder"]["lowest_cache_ratio_after"] == 0.5
    warmed = [{**r, "state_cache": "hit"} if r["route"] == "/rank" else r for r in run()]
    no_dip = analyse(warmed, samples, VERSIONS, published)
    assert no_dip["encoder"]["cache_ratio_recovered_s_after_switch"] == 0.0
    document = to_markdown(
        {
            "command": "python -m loadtest.rollout",
            "machine": {
                "cpus": 2,
                "processor": "x",
                "python": "3",
                "torch": "2",
                "load_average_at_start": 1.0,
            },
            "world": "w",
            "world_users": 10,
            "locust": {"users": 1, "user_rps": 1, "candidates": 10},
            "versions": {
                "original": "v1",
                "fusion": "v2",
                "encoder": "v3",
                "state_versions": VERSIONS.state_versions,
            },
            "analysis": report,
        }
    )
    assert "| failed requests | 1 | 0 |" in document
    assert "a target was missed" in document
