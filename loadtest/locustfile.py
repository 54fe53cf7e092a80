"""Locust traffic for the ranking service: a /rank and /events mix from Zipf-popular users.

Run through ``python -m loadtest`` (which starts Locust as a subprocess and checks thresholds),
or directly: ``locust -f loadtest/locustfile.py --host http://127.0.0.1:8000``. Traffic settings
come from ``IFA_LOADTEST_*`` environment variables (see :mod:`loadtest.traffic`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

from locust import FastHttpUser, constant, events, task
from locust.env import Environment

from loadtest.traffic import Traffic, TrafficConfig, load_ids, poisson_wait

CONFIG = TrafficConfig.from_env()
JSON_HEADERS = {"content-type": "application/json"}
_traffic: Traffic | None = None
_rank_bodies: Iterator[tuple[str, int]] | None = None


@events.init.add_listener
def load_world(environment: Environment, **_: Any) -> None:
    """Read the world's ids, and draw the /rank body pool, once per Locust process."""
    global _traffic, _rank_bodies
    users, items = load_ids(CONFIG)
    _traffic = Traffic(CONFIG, users, items)
    if CONFIG.body_pool > 0:
        pool = []
        for _draw in range(CONFIG.body_pool):
            body = _traffic.rank_body()
            pool.append((json.dumps(body), _traffic.expected_items(body)))
        _rank_bodies = itertools.cycle(pool)


def traffic() -> Traffic:
    assert _traffic is not None, "the init listener has not run"
    return _traffic


def next_rank_body() -> tuple[str, int]:
    """A serialised /rank body and the items its answer must hold."""
    if _rank_bodies is not None:
        return next(_rank_bodies)
    body = traffic().rank_body()
    return json.dumps(body), traffic().expected_items(body)


class RankingUser(FastHttpUser):
    # Poisson arrivals make offered load = users × user_rps, independent of latency until the
    # service saturates; 0 is a closed loop that sends as fast as answers come back.
    wait_time = poisson_wait(CONFIG.user_rps) if CONFIG.user_rps > 0 else constant(0)

    @task(CONFIG.rank_weight)  # a weight of 0 leaves the task out
    def rank(self) -> None:
        body, expected = next_rank_body()
        with self.client.post(
            "/rank", data=body, headers=JSON_HEADERS, name="/rank", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            items = response.json().get("items", [])
            if len(items) != expected:
                response.failure(f"{len(items)} items, expected {expected}")

    @task(CONFIG.events_weight)
    def post_events(self) -> None:
        body = traffic().events_body()
        with self.client.post(
            "/events", json=body, name="/events", catch_response=True
        ) as response:
            if response.status_code not in (200, 202):
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            answer = response.json()
            if answer.get("accepted", 0) + answer.get("duplicates", 0) != len(body["events"]):
                response.failure(f"accepted+duplicates != {len(body['events'])}: {answer}")
