"""What the load test sends: users, candidate sets and event batches, as plain Python.

Kept free of Locust (and of torch) so the runner, the capacity curve and the tests can import it
without gevent's monkey-patching; :mod:`loadtest.locustfile` is the thin Locust wrapper.

Traffic is configured through the environment, because Locust runs the locustfile in its own
process (the runner passes these on):

``IFA_LOADTEST_WORLD``            world directory with ``users.parquet`` / ``items.parquet``
                                  (default ``data/worlds/small-0``). Where a file is missing the
                                  ids fall back to ``0..IFA_LOADTEST_FALLBACK_USERS-1`` and
                                  ``0..IFA_LOADTEST_FALLBACK_ITEMS-1``.
``IFA_LOADTEST_CANDIDATES``       candidates per /rank (default 1000, a production-sized set).
``IFA_LOADTEST_K``                items asked back (default 50).
``IFA_LOADTEST_RANK_WEIGHT``      relative weight of /rank tasks (default 4).
``IFA_LOADTEST_EVENTS_WEIGHT``    relative weight of /events tasks (default 1).
``IFA_LOADTEST_EVENTS_PER_POST``  events in one /events batch (default 10).
``IFA_LOADTEST_ZIPF``             Zipf exponent of user popularity (default 1.1).
``IFA_LOADTEST_OUTSIDE_SHARE``    share of every candidate set outside the model's catalogue, the
                                  same count (rounded) in every /rank (default 0.01).
``IFA_LOADTEST_LIVE_POOL``        live-catalogue items: ids past the catalogue's that the caller
                                  registers with ``PUT /items`` before the run (see
                                  :attr:`Traffic.live_ids`); when > 0 they make half of the
                                  outside candidates (default 0: none).
``IFA_LOADTEST_UNKNOWN_POOL``     ids nobody registers, scored with OOV rows: the rest of the
                                  outside candidates (default 2000). Both pools recur across
                                  requests, as new items do on a feed, so each id is looked up in
                                  the item table once per cache TTL, not once per request.
``IFA_LOADTEST_DUPLICATE_FRACTION`` share of /events posts that resend an earlier batch, as a
                                  client retry would (default 0.02).
``IFA_LOADTEST_USER_RPS``         tasks per second per simulated user, as Poisson arrivals
                                  (see :func:`poisson_wait`); 0 runs a closed loop with no
                                  wait (default 2).
``IFA_LOADTEST_SEED``             random seed of the id permutation (default 0).
``IFA_LOADTEST_BODY_POOL``        /rank bodies drawn and serialised once at start and cycled
                                  (default 256; 0 draws each request afresh). Drawing 1,000
                                  candidates and encoding them costs a Locust process about as
                                  much CPU as the rest of a request, and a generator that runs out
                                  of CPU stalls and then sends in bursts.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_WORLD = Path("data/worlds/small-0")

# Action mix of a feed: most events are impressions, a few are engagements.
ACTION_MIX: dict[str, float] = {"impression": 0.70, "click": 0.20, "long_view": 0.07, "like": 0.03}


@dataclass(frozen=True)
class TrafficConfig:
    world: Path = DEFAULT_WORLD
    candidates: int = 1000
    k: int = 50
    rank_weight: int = 4
    events_weight: int = 1
    events_per_post: int = 10
    zipf: float = 1.1
    outside_share: float = 0.01
    live_pool: int = 0
    unknown_pool: int = 2000
    duplicate_fraction: float = 0.02
    user_rps: float = 2.0
    seed: int = 0
    body_pool: int = 256
    fallback_users: int = 10_000
    fallback_items: int = 100_000

    @staticmethod
    def env_name(field_name: str) -> str:
        return f"IFA_LOADTEST_{field_name.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TrafficConfig:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is None or raw == "":
                continue
            default = getattr(cls, f.name)
            values[f.name] = type(default)(raw)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        return {self.env_name(f.name): str(getattr(self, f.name)) for f in fields(self)}


def read_ids(path: Path, column: str) -> list[int] | None:
    """The id column of a parquet file, or None where the file does not exist."""
    if not path.is_file():
        return None
    import pyarrow.parquet as pq  # only here: the fallback path must not need pyarrow

    return [int(v) for v in pq.read_table(path, columns=[column]).column(column).to_pylist()]


def load_ids(config: TrafficConfig) -> tuple[list[int], list[int]]:
    """(user ids, item ids) of the world, or ``0..N-1`` ranges where its files are missing."""
    users = read_ids(config.world / "users.parquet", "user_id")
    items = read_ids(config.world / "items.parquet", "item_id")
    if users is None:
        log.warning(
            "no %s; users are 0..%d", config.world / "users.parquet", config.fallback_users - 1
        )
        users = list(range(config.fallback_users))
    if items is None:
        log.warning(
            "no %s; items are 0..%d", config.world / "items.parquet", config.fallback_items - 1
        )
        items = list(range(config.fallback_items))
    if not users or not items:
        raise ValueError(f"world {config.world} has no users or no items")
    return users, items


def poisson_wait(rate: float) -> Callable[[Any], float]:
    """A Locust ``wait_time`` that makes each user's task starts a Poisson process of ``rate``/s.

    Offered load is then users × rate with exponential gaps, as independent clients produce.
    Locust's ``constant_throughput`` keeps users that spawned together in lockstep, so they fire
    in bursts of ``users`` simultaneous requests, which measures queueing behind the burst rather
    than the service. Starts are scheduled from the previous *scheduled* start, so response time
    does not lower the rate; a user that falls behind starts at once but does not burst to catch
    up (its rate drops, as a closed loop's would).
    """
    rng = random.Random()

    def wait_time(user: Any) -> float:
        now = time.monotonic()
        scheduled = getattr(user, "_next_start", now) + rng.expovariate(rate)
        user._next_start = max(scheduled, now)
        return float(user._next_start - now)

    return wait_time


class Traffic:
    """Draws requests: users by Zipf-like popularity, candidates uniformly from the catalogue."""

    def __init__(self, config: TrafficConfig, user_ids: Sequence[int], item_ids: Sequence[int]):
        self.config = config
        rng = random.Random(config.seed)
        # Popularity ranks are a seeded shuffle, so the head users are not simply the smallest ids.
        self.user_ids = list(user_ids)
        rng.shuffle(self.user_ids)
        self.user_cum_weights = list(
            itertools.accumulate(
                1.0 / (rank**config.zipf) for rank in range(1, len(self.user_ids) + 1)
            )
        )
        self.item_ids = list(item_ids)
        self.candidates = min(config.candidates, len(self.item_ids))
        if not 0.0 <= config.outside_share <= 1.0:
            raise ValueError(f"outside_share must be within [0, 1], got {config.outside_share}")
        outside = round(config.outside_share * self.candidates)
        self.live_per_request = outside // 2 if config.live_pool > 0 else 0
        self.unknown_per_request = outside - self.live_per_request
        # Ids past the largest known one stand for items the model has not seen yet: first the
        # live pool, then the unknown one, so the two never overlap and every process that
        # builds a Traffic of the same config and world (Locust's included) draws the same ids.
        start = max(self.item_ids) + 1
        self.live_ids = list(range(start, start + config.live_pool))
        """Ids the caller must register (``PUT /items``) for them to be live-catalogue items."""
        self.unknown_ids = list(
            range(start + config.live_pool, start + config.live_pool + config.unknown_pool)
        )
        for name, pool, needed in (
            ("live_pool", self.live_ids, self.live_per_request),
            ("unknown_pool", self.unknown_ids, self.unknown_per_request),
        ):
            if len(pool) < needed:
                raise ValueError(
                    f"{name} of {len(pool)} ids cannot give {needed} unique candidates a request"
                )
        self.rng = random.Random()
        self.sent_batches: list[dict[str, Any]] = []

    def user(self) -> int:
        return self.rng.choices(self.user_ids, cum_weights=self.user_cum_weights)[0]

    def candidate_ids(self) -> list[int]:
        """A candidate set: unique ids, exactly :attr:`live_per_request` from the live pool and
        :attr:`unknown_per_request` from the unknown one, the rest from the catalogue, shuffled
        (a ranker must not find the new items in one block)."""
        outside = self.live_per_request + self.unknown_per_request
        candidates = self.rng.sample(self.item_ids, self.candidates - outside)
        candidates += self.rng.sample(self.live_ids, self.live_per_request)
        candidates += self.rng.sample(self.unknown_ids, self.unknown_per_request)
        self.rng.shuffle(candidates)
        return candidates

    def rank_body(self) -> dict[str, Any]:
        return {"user_id": self.user(), "candidate_ids": self.candidate_ids(), "k": self.config.k}

    def expected_items(self, body: Mapping[str, Any]) -> int:
        return min(int(body["k"]), len(body["candidate_ids"]))

    def events_body(self) -> dict[str, Any]:
        """A fresh batch for one user, or now and then a resend of an earlier batch."""
        if self.sent_batches and self.rng.random() < self.config.duplicate_fraction:
            return self.rng.choice(self.sent_batches)
        user = self.user()
        now = time.time()
        actions = self.rng.choices(
            list(ACTION_MIX), weights=list(ACTION_MIX.values()), k=self.config.events_per_post
        )
        body = {
            "events": [
                {
                    "event_id": uuid.uuid4().hex,
                    "user_id": user,
                    "item_id": self.rng.choice(self.item_ids),
                    "action": action,
                    # Spread within the last second, in order, like a client flushing a buffer.
                    "timestamp": now - (len(actions) - i) * 1e-3,
                }
                for i, action in enumerate(actions)
            ]
        }
        # A bounded memory of past batches is enough to resend one now and then.
        if len(self.sent_batches) < 100:
            self.sent_batches.append(body)
        else:
            self.sent_batches[self.rng.randrange(100)] = body
        return body
