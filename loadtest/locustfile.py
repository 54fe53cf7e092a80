"""Locust traffic for the ranking service: a /rank and /events mix from Zipf-popular users.

Run through ``python -m loadtest`` (which starts Locust as a subprocess and checks thresholds),
or directly: ``locust -f loadtest/locustfile.py --host http://127.0.0.1:8000``. Traffic settings
come from ``IFA_LOADTEST_*`` environment variables (see :mod:`loadtest.traffic`).

With ``IFA_LOADTEST_RECORD_DIR`` set, every request is also written to
``<dir>/requests-<pid>.jsonl``: start and end (unix seconds), route, status, the rank's
``user_id``, ``state_cache``, ``model_version`` and ``history_length``, and the event ids a 2xx
/events acknowledged. Fault tests judge a run by it (what was acknowledged, what each phase of an
outage answered, whether a rank missed an acknowledged event); the rollout measurement by the
versions and cache outcomes over time.

With ``IFA_LOADTEST_TOKEN`` set, /events carries it as a bearer token (a service with
``IFA_API_TOKEN`` refuses anonymous writes).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from locust import FastHttpUser, constant, events, task
from locust.env import Environment

from loadtest.traffic import Traffic, TrafficConfig, load_ids, poisson_wait

CONFIG = TrafficConfig.from_env()
JSON_HEADERS = {"content-type": "application/json"}
RECORD_DIR_VARIABLE = "IFA_LOADTEST_RECORD_DIR"
TOKEN_VARIABLE = "IFA_LOADTEST_TOKEN"
WRITE_HEADERS = (
    {"Authorization": f"Bearer {os.environ[TOKEN_VARIABLE]}"}
    if os.environ.get(TOKEN_VARIABLE)
    else {}
)
_traffic: Traffic | None = None
_rank_bodies: Iterator[tuple[str, int]] | None = None
_record: TextIO | None = None


@events.init.add_listener
def load_world(environment: Environment, **_: Any) -> None:
    """Read the world's ids, draw the /rank body pool and open the request record, once per
    Locust process, before any user starts."""
    global _traffic, _rank_bodies, _record
    users, items = load_ids(CONFIG)
    _traffic = Traffic(CONFIG, users, items)
    if CONFIG.body_pool > 0:
        pool = []
        for _draw in range(CONFIG.body_pool):
            body = _traffic.rank_body()
            pool.append((json.dumps(body), _traffic.expected_items(body)))
        _rank_bodies = itertools.cycle(pool)
    directory = os.environ.get(RECORD_DIR_VARIABLE)
    if directory:
        path = Path(directory) / f"requests-{os.getpid()}.jsonl"
        _record = path.open("a", buffering=1)  # line-buffered: a killed run keeps its lines


def record(route: str, started: float, status: int, **details: Any) -> None:
    if _record is not None:
        line = {"route": route, "start": started, "end": time.time(), "status": status}
        _record.write(json.dumps(line | details) + "\n")


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
        started = time.time()
        with self.client.post(
            "/rank", data=body, headers=JSON_HEADERS, name="/rank", catch_response=True
        ) as response:
            if _record is not None:
                answer = response.json() if response.status_code == 200 else {}
                record(
                    "/rank",
                    started,
                    response.status_code,
                    user_id=json.loads(body)["user_id"],
                    state_cache=answer.get("state_cache"),
                    model_version=answer.get("model_version"),
                    history_length=answer.get("history_length"),
                )
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            items = response.json().get("items", [])
            if len(items) != expected:
                response.failure(f"{len(items)} items, expected {expected}")

    @task(CONFIG.events_weight)
    def post_events(self) -> None:
        body = traffic().events_body()
        started = time.time()
        with self.client.post(
            "/events", json=body, headers=WRITE_HEADERS, name="/events", catch_response=True
        ) as response:
            acknowledged = response.status_code in (200, 202)
            ids = [(e["user_id"], e["event_id"]) for e in body["events"]] if acknowledged else []
            record("/events", started, response.status_code, acked=ids)
            if response.status_code not in (200, 202):
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            answer = response.json()
            if answer.get("accepted", 0) + answer.get("duplicates", 0) != len(body["events"]):
                response.failure(f"accepted+duplicates != {len(body['events'])}: {answer}")
