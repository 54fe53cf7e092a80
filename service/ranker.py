"""The /rank pipeline: featurise, get the user's state, score the whole set once, take the top k.

State retrieval follows DESIGN §2: a cached state whose cursor equals the log length is a hit; a
smaller cursor is stale and only the events after it are folded in; no state is a miss and the
whole log is encoded. A changed state is written back with a compare-and-set on its cursor while
the scorer runs. Concurrent misses of one user share one computation (single flight), so that a
burst of requests for a cold user encodes its history once: the shared work re-reads the cached
state first (another request, on this replica or another, may have stored it since this one's
snapshot) and ends only once the encoded state is stored, so a request that missed a moment ago
finds it instead of encoding again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import orjson

from service.errors import ModelError
from service.metrics import Metrics
from service.runtime import ModelRuntime, Scored
from service.state import StateFormatError, UserState, decode_state, encode_state
from service.stores.base import Store, StoreError, UserSnapshot

logger = logging.getLogger("service")

CacheOutcome = Literal["hit", "miss", "stale"]
T = TypeVar("T")


@dataclass(frozen=True)
class RankResult:
    item_ids: np.ndarray  # (M,) int64, as requested
    scored: Scored
    unknown_items: int
    history_length: int
    cache: CacheOutcome


class Ranker:
    def __init__(
        self,
        runtime: ModelRuntime,
        store: Store,
        metrics: Metrics,
        state_ttl_seconds: int,
        state_cache: bool = True,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.metrics = metrics
        self.state_ttl_seconds = state_ttl_seconds
        self.state_cache = state_cache
        self._inflight: dict[int, asyncio.Future[UserState]] = {}

    async def rank(
        self,
        user_id: int,
        candidate_ids: list[int],
        k: int,
        request_time: float | None = None,
        received_at: float | None = None,
    ) -> bytes:
        """The serialised response body. ``received_at`` (perf_counter) times the validate stage."""
        started = time.perf_counter()
        if received_at is not None:
            self.metrics.observe_stage("validate", started - received_at)
        result = await self.score(user_id, candidate_ids, request_time)
        started = time.perf_counter()
        body = self.render(result, k)
        self.metrics.observe_stage("serialise", time.perf_counter() - started)
        return body

    async def score(
        self, user_id: int, candidate_ids: list[int], request_time: float | None = None
    ) -> RankResult:
        """Every candidate's probabilities and score, in request order."""
        runtime, metrics = self.runtime, self.metrics
        # The store round trip is sent first and featurisation runs while it is in flight; the
        # two stages overlap in wall time.
        fetch_started = time.perf_counter()
        fetch = asyncio.ensure_future(
            self.store.snapshot(runtime.version, user_id, self.state_ttl_seconds)
        )
        await asyncio.sleep(0)  # let the fetch write its request before the loop is busy
        started = time.perf_counter()
        try:
            item_ids = np.asarray(candidate_ids, dtype=np.int64)
            candidate_rows, known = runtime.candidate_rows(item_ids)
        except BaseException:
            fetch.cancel()
            raise
        unknown = int(item_ids.size - np.count_nonzero(known))
        featurize_seconds = time.perf_counter() - started
        metrics.rank_candidates.observe(item_ids.size)
        metrics.candidates.inc(item_ids.size)
        if unknown:
            metrics.unknown_items.inc(unknown)

        snapshot = await fetch
        metrics.observe_stage("state_fetch", time.perf_counter() - fetch_started)
        state, outcome, stored = await self._current_state(user_id, snapshot)
        metrics.state_cache.labels(outcome=outcome).inc()

        started = time.perf_counter()
        user_row = runtime.user_row(user_id, snapshot.profile)
        metrics.observe_stage("featurize", featurize_seconds + time.perf_counter() - started)

        write_back: asyncio.Task[None] | None = None
        if self.state_cache and outcome != "hit" and state.cursor > stored:
            write_back = asyncio.create_task(self._write_back(user_id, state))
        when = time.time() if request_time is None else request_time
        try:
            scored = await self._model(lambda: runtime.score(user_row, candidate_rows, state, when))
        finally:
            if write_back is not None:
                await write_back
        metrics.observe_stage("forward", scored.forward_seconds)
        metrics.notify("forward_cpu", scored.forward_cpu_seconds)
        return RankResult(item_ids, scored, unknown, state.cursor, outcome)

    def render(self, result: RankResult, k: int) -> bytes:
        """Top k, best first, as the JSON body of :class:`service.schemas.RankResponse`."""
        scores = result.scored.scores
        order = np.argsort(-scores, kind="stable")[:k]
        names = self.runtime.objectives
        items = [
            {
                "item_id": item_id,
                "score": score,
                "probabilities": dict(zip(names, row, strict=True)),
            }
            for item_id, score, row in zip(
                result.item_ids[order].tolist(),
                scores[order].tolist(),
                result.scored.probabilities[order].tolist(),
                strict=True,
            )
        ]
        return orjson.dumps(
            {
                "model_version": self.runtime.version,
                "items": items,
                "unknown_items": result.unknown_items,
                "history_length": result.history_length,
                "state_cache": result.cache,
            }
        )

    # -- the user state ----------------------------------------------------------------------

    async def _current_state(
        self, user_id: int, snapshot: UserSnapshot
    ) -> tuple[UserState, CacheOutcome, int]:
        """The user's current state, the cache outcome, and the cursor the cache already holds
        (a state with a larger one is worth writing back)."""
        runtime = self.runtime
        if not self.state_cache:
            if snapshot.log_length == 0:
                return runtime.empty_state(), "miss", 0
            return await self._encode_history(user_id), "miss", 0
        state = self._decode(user_id, snapshot.state)
        if state is not None and state.cursor >= snapshot.log_length:
            return state, "hit", state.cursor
        if state is None and snapshot.log_length == 0:
            return runtime.empty_state(), "miss", 0
        if state is None:
            state = await self._single_flight(user_id, self._cached_or_encoded(user_id))
            outcome: CacheOutcome = "miss"
        else:
            outcome = "stale"
        stored = state.cursor
        if state.cursor < snapshot.log_length:
            state = await self._fold_newer(user_id, state)
        return state, outcome, stored

    def _decode(self, user_id: int, blob: bytes | None) -> UserState | None:
        if blob is None:
            return None
        runtime = self.runtime
        try:
            return decode_state(blob, runtime.heads, runtime.key_dim, runtime.value_dim)
        except StateFormatError as error:
            # Treated as a miss: the recomputed state replaces it (its cursor is larger).
            logger.warning("discarding cached state of a user: %s", error)
            return None

    async def _cached_or_encoded(self, user_id: int) -> UserState:
        """The single-flight work of a miss: the cached state if one was stored since the
        snapshot, else the whole history encoded and stored before the flight ends."""
        snapshot = await self.store.snapshot(self.runtime.version, user_id, self.state_ttl_seconds)
        state = self._decode(user_id, snapshot.state)
        if state is not None:
            return state
        state = await self._encode_history(user_id)
        if state.cursor > 0:
            await self._write_back(user_id, state)
        return state

    async def _encode_history(self, user_id: int) -> UserState:
        started = time.perf_counter()
        log = await self.store.read_events(user_id, 0)
        self.metrics.observe_stage("state_fetch", time.perf_counter() - started)
        started = time.perf_counter()
        state = await self._model(lambda: self.runtime.encode_history(log))
        self.metrics.observe_stage("encode", time.perf_counter() - started)
        return state

    async def _fold_newer(self, user_id: int, state: UserState) -> UserState:
        started = time.perf_counter()
        log = await self.store.read_events(user_id, state.cursor)
        self.metrics.observe_stage("state_fetch", time.perf_counter() - started)
        started = time.perf_counter()
        folded = await self._model(lambda: self.runtime.fold_events(state, log))
        self.metrics.observe_stage("fold", time.perf_counter() - started)
        return folded

    async def _single_flight(self, user_id: int, work: Awaitable[UserState]) -> UserState:
        """Run ``work`` unless the same user's history is being encoded already; share that."""
        running = self._inflight.get(user_id)
        if running is not None:
            if asyncio.iscoroutine(work):
                work.close()  # never started: nothing to undo
            return await asyncio.shield(running)
        future: asyncio.Future[UserState] = asyncio.ensure_future(work)
        self._inflight[user_id] = future
        try:
            return await asyncio.shield(future)
        finally:
            if self._inflight.get(user_id) is future:
                del self._inflight[user_id]

    async def _write_back(self, user_id: int, state: UserState) -> None:
        try:
            await self.store.put_state(
                self.runtime.version,
                user_id,
                encode_state(state),
                state.cursor,
                self.state_ttl_seconds,
            )
        except StoreError as error:
            # A lost write only costs a recomputation later (DESIGN §2); the request goes on.
            logger.warning("state write-back failed: %s", error)

    async def _model(self, job: Callable[[], T]) -> T:
        try:
            return await self.runtime.run(job)
        except Exception as error:
            raise ModelError(str(error)) from error
