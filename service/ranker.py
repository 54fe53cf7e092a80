"""The /rank pipeline: featurise, get the user's state, score the whole set once, take the top k.

State retrieval follows DESIGN §2 over a bounded window: the state covers the user's most recent
``max_history`` events by log position, [end - max_history, end). A cached state whose window is
that window is a hit; an older one is stale: events past its cursor are folded in and events that
left the window are folded out (the state is a sum, so it stays exactly the state of the kept
window); no usable state is a miss and the window is encoded from scratch. A state found wrong
(undecodable, non-finite, a cursor beyond the log, a window whose evicted events are gone) is
replaced, not kept: its write-back is not a compare-and-set against the wrong entry's cursor.

Deadlines: the state (store round trips, folds) has ``state_budget_seconds``; past it, or when
the store fails, the request is answered from this worker's recent copy of the user's state, or
an empty one, and says so (``state_cache: "degraded"``). Changed states are written back in the
background: the response never waits for it. Concurrent misses of one user share one
computation (single flight), so that a burst of requests for a cold user encodes its history once;
a request whose snapshot holds events the flight did not read folds them in (read-your-writes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import numpy as np
import orjson

from service.errors import ModelError, Overloaded
from service.items import LiveCatalogue
from service.metrics import Metrics
from service.runtime import ModelRuntime, Scored
from service.state import (
    NonFiniteState,
    StateFormatError,
    UserState,
    decode_state,
    encode_state,
    is_finite,
)
from service.stores.base import Store, StoreError, UserSnapshot
from service.stores.records import EventLog

logger = logging.getLogger("service")

CacheOutcome = Literal["hit", "miss", "stale", "degraded"]
RepairReason = Literal["undecodable", "non_finite", "cursor_beyond_log", "window_unreachable"]
T = TypeVar("T")

MAX_PENDING_WRITE_BACKS = 256
"""Background state writes in flight per worker; past it (a slow store) new ones are skipped:
a lost write-back only costs a recomputation later."""


DEGRADED_LOG_INTERVAL_SECONDS = 10.0

REENCODE_AFTER_WINDOWS = 4
"""A state that has folded out this many windows' worth of events since its last encoding from
scratch is encoded from scratch again (outcome miss): float32 rounding of the folds would
otherwise accumulate without bound for a user who stays active; this bounds it at a cost of one
window encoding per 4 · max_history events."""


@dataclass(frozen=True)
class RankResult:
    item_ids: np.ndarray  # (M,) int64, as requested
    scored: Scored
    unknown_items: int
    history_length: int
    cache: CacheOutcome


@dataclass(frozen=True)
class _Flown:
    """What a single flight computed: the state and its write-back (None when none started)."""

    state: UserState
    write: asyncio.Task[None] | None


@dataclass(frozen=True)
class CurrentState:
    state: UserState
    outcome: CacheOutcome
    write: bool
    """Write the state back (it changed)."""
    replace: bool = False
    """Write it even over a cached entry with a larger cursor (that entry was wrong)."""


class LocalStates:
    """This worker's most recent states by user (LRU): what a degraded request answers from."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[UserState, dict[str, int]]] = OrderedDict()

    def put(self, user_id: int, state: UserState, profile: dict[str, int]) -> None:
        if self.capacity <= 0:
            return
        self._entries[user_id] = (state, profile)
        self._entries.move_to_end(user_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, user_id: int) -> tuple[UserState, dict[str, int]] | None:
        return self._entries.get(user_id)


class Ranker:
    def __init__(
        self,
        runtime: ModelRuntime,
        store: Store,
        metrics: Metrics,
        state_ttl_seconds: int,
        items: LiveCatalogue,
        state_cache: bool = True,
        max_history: int = 1000,
        state_budget_seconds: float = 0.2,
        local_states: int = 0,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.metrics = metrics
        self.items = items
        """Item features of candidates and of the events folded: the live catalogue."""
        self.state_ttl_seconds = state_ttl_seconds
        self.state_cache = state_cache
        self.max_history = max_history
        self.state_budget_seconds = state_budget_seconds
        self.local = LocalStates(local_states)
        self._inflight: dict[int, asyncio.Future[_Flown]] = {}
        """Each user's single flight, until its state is stored (:meth:`_single_flight`)."""
        self._write_backs: set[asyncio.Task[None]] = set()
        self._degraded_logged_at = -DEGRADED_LOG_INTERVAL_SECONDS

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
        # The store round trips are sent first and featurisation runs while they are in flight;
        # the two stages overlap in wall time (an item-table lookup, when the item cache needs
        # one, is in flight together with the state's).
        fetch_started = time.perf_counter()
        fetch = asyncio.ensure_future(self._state_within_budget(user_id))
        await asyncio.sleep(0)  # let the fetch write its request before the loop is busy
        started = time.perf_counter()
        try:
            item_ids = np.asarray(candidate_ids, dtype=np.int64)
            items = await self.items.rows(item_ids)
        except BaseException:
            fetch.cancel()
            raise
        candidate_rows = items.rows
        unknown = int(item_ids.size - np.count_nonzero(items.known))
        unknown_attribute = int(np.count_nonzero(items.oov_attribute))
        featurize_seconds = time.perf_counter() - started
        metrics.rank_candidates.observe(item_ids.size)
        metrics.candidates.inc(item_ids.size)
        if unknown:
            metrics.unknown_items.labels(reason="unknown_id").inc(unknown)
        if unknown_attribute:
            metrics.unknown_items.labels(reason="unknown_attribute").inc(unknown_attribute)

        current, profile = await fetch
        metrics.observe_stage("state_fetch", time.perf_counter() - fetch_started)
        state = current.state
        metrics.state_cache.labels(outcome=current.outcome).inc()

        started = time.perf_counter()
        user_row = runtime.user_row(user_id, profile)
        metrics.observe_stage("featurize", featurize_seconds + time.perf_counter() - started)

        if self.state_cache and current.write:
            self._start_write_back(user_id, state, current.replace)
        when = time.time() if request_time is None else request_time
        scored = await self._model(lambda: runtime.score(user_row, candidate_rows, state, when))
        metrics.observe_stage("forward", scored.forward_seconds)
        metrics.notify("forward_cpu", scored.forward_cpu_seconds)
        return RankResult(item_ids, scored, unknown, state.cursor - state.start, current.outcome)

    async def user_state(self, user_id: int) -> tuple[CurrentState, dict[str, int]]:
        """The state and profile a /rank of this user would score with now (its write-back
        started as /rank would): for callers other than /rank (/explain, the rollout warm-up)."""
        current, profile = await self._state_within_budget(user_id)
        if self.state_cache and current.write:
            self._start_write_back(user_id, current.state, current.replace)
        return current, profile

    def render(self, result: RankResult, k: int) -> bytes:
        """Top k, best first, as the JSON body of :class:`service.schemas.RankResponse`."""
        scores = result.scored.scores
        order = top_k(scores, k)
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

    async def _state_within_budget(self, user_id: int) -> tuple[CurrentState, dict[str, int]]:
        """The user's current state and profile, or a degraded answer when the store fails or
        does not answer within the state's share of the request budget."""
        try:
            async with asyncio.timeout(self.state_budget_seconds):
                await self.runtime.agree_layout(self.store, self.max_history)
                snapshot = await self.store.snapshot(
                    self.runtime.state_version, user_id, self.state_ttl_seconds
                )
                current = await self._current_state(user_id, snapshot)
        except (StoreError, TimeoutError) as error:
            now = time.monotonic()
            if now - self._degraded_logged_at >= DEGRADED_LOG_INTERVAL_SECONDS:
                # Once in a while, not per request: an outage must not flood the log.
                self._degraded_logged_at = now
                logger.warning("answering degraded: %s", error or "state budget spent")
            recent = self.local.get(user_id)
            if recent is not None:
                return CurrentState(recent[0], "degraded", write=False), recent[1]
            return CurrentState(self.runtime.empty_state(), "degraded", write=False), {}
        self.local.put(user_id, current.state, snapshot.profile)
        return current, snapshot.profile

    def _window_start(self, end: int) -> int:
        return max(0, end - self.max_history)

    async def _current_state(self, user_id: int, snapshot: UserSnapshot) -> CurrentState:
        runtime = self.runtime
        end = snapshot.log_length
        window_start = self._window_start(end)
        if not self.state_cache:
            if end == window_start:
                return CurrentState(runtime.empty_state(), "miss", write=False)
            return CurrentState(await self._encode_window(user_id, window_start), "miss", False)
        state, repair = self._decode(snapshot)
        if state is not None and state.start == window_start and state.cursor == end:
            return CurrentState(state, "hit", write=False)
        if state is not None and window_start - state.anchor >= (
            REENCODE_AFTER_WINDOWS * self.max_history
        ):
            state = None  # not wrong, only due for a fresh encoding
        if state is not None:
            try:
                folded = await self._refold(user_id, state, window_start)
            except _Unreachable:
                repair = "window_unreachable"
            else:
                if is_finite(folded):
                    return CurrentState(folded, "stale", write=True)
                repair = "non_finite"
        if repair is not None:
            self.metrics.state_repairs.labels(reason=repair).inc()
            logger.warning("replacing the cached state of a user: %s", repair)
        if end == window_start:
            empty = replace(runtime.empty_state(), start=end, cursor=end)
            return CurrentState(empty, "miss", write=repair is not None, replace=True)
        state = await self._single_flight(
            user_id, lambda: self._stored_or_encoded(user_id, window_start, end, repair is not None)
        )
        if not is_finite(state):
            raise ModelError("the encoder produced a non-finite state")
        if state.cursor < end:
            # A flight that read the log before this request's snapshot (it was joined, or
            # it had finished and was storing its state): the events acknowledged since are
            # folded in here, so the answer never misses an event /events acknowledged.
            try:
                folded = await self._refold(user_id, state, window_start)
            except _Unreachable:
                state = await self._encode_window(user_id, window_start)
                return CurrentState(state, "miss", write=True)
            return CurrentState(folded, "stale", write=True)
        # The single flight has started its write-back (a repair included).
        return CurrentState(state, "miss", write=False)

    async def _stored_or_encoded(
        self, user_id: int, window_start: int, end: int, replace_wrong: bool
    ) -> _Flown:
        """The single-flight work of a miss: a state of the window stored since this request's
        snapshot (by another worker or replica), else the window encoded. Its write-back runs in
        the background, and the flight stays open until it is done (:meth:`_single_flight`), so
        that a request that missed a moment ago joins it instead of encoding again."""
        if not replace_wrong:
            snapshot = await self.store.snapshot(
                self.runtime.state_version, user_id, self.state_ttl_seconds
            )
            stored, _ = self._decode(snapshot)
            if stored is not None and stored.start == window_start and stored.cursor >= end:
                return _Flown(stored, None)
        state = await self._encode_window(user_id, window_start)
        write = None
        if self.state_cache and is_finite(state):
            write = self._start_write_back(user_id, state, replace_wrong)
        return _Flown(state, write)

    def _decode(self, snapshot: UserSnapshot) -> tuple[UserState | None, RepairReason | None]:
        """The cached state if it can be used as a starting point, else why not."""
        if snapshot.state is None:
            return None, None
        runtime = self.runtime
        try:
            state = decode_state(snapshot.state, runtime.heads, runtime.key_dim, runtime.value_dim)
        except NonFiniteState:
            return None, "non_finite"
        except StateFormatError:
            return None, "undecodable"
        if state.cursor > snapshot.log_length:
            # The log was truncated or restored behind the state: the events it claims are not
            # (all) the log's, and events appended since would never be folded.
            return None, "cursor_beyond_log"
        if state.start > self._window_start(snapshot.log_length) or (
            state.start < self._window_start(snapshot.log_length)
            and state.start < snapshot.log_start
        ):
            # A larger window than the state's, or evicted events no longer in the log to fold
            # out: only a fresh encoding of the window is right.
            return None, "window_unreachable"
        return state, None

    async def _encode_window(self, user_id: int, window_start: int) -> UserState:
        started = time.perf_counter()
        log = await self.store.read_events(user_id, window_start)
        # Events appended since the snapshot may have moved the window on.
        log = await self.items.with_item_rows(self._within_window(log))
        self.metrics.observe_stage("state_fetch", time.perf_counter() - started)
        start = log.end - len(log)
        started = time.perf_counter()
        state = await self._model(lambda: self.runtime.encode_history(log, start), long=True)
        self.metrics.observe_stage("encode", time.perf_counter() - started)
        return state

    def _within_window(self, log: EventLog) -> EventLog:
        window_start = self._window_start(log.end)
        if len(log) and int(log.positions.min()) < window_start:
            return log.select(log.positions >= window_start, log.end)
        return log

    async def _refold(self, user_id: int, state: UserState, window_start: int) -> UserState:
        """Fold the events after the cursor in and the events before the window out."""
        started = time.perf_counter()
        evict_stop = min(window_start, state.cursor)
        reads: list[Awaitable[EventLog]] = [self.store.read_events(user_id, state.cursor)]
        if state.start < evict_stop:
            reads.append(self.store.read_events(user_id, state.start, evict_stop))
        logs = await asyncio.gather(*reads)
        newer = logs[0]
        if len(newer) != newer.end - state.cursor:
            raise _Unreachable  # trimmed past the cursor since the snapshot
        evicted = logs[1] if len(logs) > 1 else None
        if evicted is not None and len(evicted) != evict_stop - state.start:
            raise _Unreachable  # the events to fold out were trimmed since the snapshot
        # Events past the cursor that already left the window are never folded in. Events
        # appended since the snapshot are folded in; the next request folds out what they push
        # out of the window.
        if len(newer) and int(newer.positions.min()) < window_start:
            newer = newer.select(newer.positions >= window_start, newer.end)
        # Events are folded in with their items' features as of now; an evicted event is folded
        # out with its item's features as of now too, which differ from those it was folded in
        # with only when the item was updated meanwhile (a difference that the state keeps until
        # its next encoding from scratch, REENCODE_AFTER_WINDOWS windows at most).
        newer = await self.items.with_item_rows(newer)
        if evicted is not None:
            evicted = await self.items.with_item_rows(evicted)
        self.metrics.observe_stage("state_fetch", time.perf_counter() - started)
        runtime = self.runtime
        started = time.perf_counter()

        def refold() -> UserState:
            current = state
            if evicted is not None:
                current = runtime.unfold_events(current, evicted, evict_stop)
            current = replace(current, start=window_start)
            return runtime.fold_events(current, newer)

        folded = await self._model(refold)
        self.metrics.observe_stage("fold", time.perf_counter() - started)
        return folded

    async def _single_flight(
        self, user_id: int, work: Callable[[], Awaitable[_Flown]]
    ) -> UserState:
        """The state of the user's flight: a running one joined, else ``work()`` started as one.

        A flight is a task of its own: a caller that is cancelled (its state budget spent)
        leaves it running for the others, and it stays open until its work is done and the
        state it computed is stored, so that a request whose snapshot predates that store joins
        it rather than encoding again. Its state may then be older than the joiner's snapshot:
        the caller checks the cursor (:meth:`_current_state`)."""
        flight = self._inflight.get(user_id)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._inflight[user_id] = flight
            flight.add_done_callback(lambda done: self._land(user_id, done))
        flown = await asyncio.shield(flight)
        return flown.state

    def _land(self, user_id: int, flight: asyncio.Future[_Flown]) -> None:
        """End the flight once its write-back (if any) is done."""

        def end(_: object = None) -> None:
            if self._inflight.get(user_id) is flight:
                del self._inflight[user_id]

        if flight.cancelled() or flight.exception() is not None:
            end()  # exception() also marks it retrieved when every caller was cancelled
            return
        write = flight.result().write
        if write is None or write.done():
            end()
        else:
            write.add_done_callback(end)

    # -- write-back ---------------------------------------------------------------------------

    def _start_write_back(
        self, user_id: int, state: UserState, replace_wrong: bool
    ) -> asyncio.Task[None] | None:
        """Write the state back in the background: the response does not wait for the store.
        None when too many write-backs are pending already (the write is skipped)."""
        if len(self._write_backs) >= MAX_PENDING_WRITE_BACKS:
            self.metrics.write_backs_skipped.inc()
            return None
        task = asyncio.create_task(self._write_back(user_id, state, replace_wrong))
        self._write_backs.add(task)
        task.add_done_callback(self._write_backs.discard)
        return task

    async def _write_back(self, user_id: int, state: UserState, replace_wrong: bool) -> None:
        try:
            async with asyncio.timeout(self.state_budget_seconds * 2):
                await self.store.put_state(
                    self.runtime.state_version,
                    user_id,
                    encode_state(state),
                    state.cursor,
                    self.state_ttl_seconds,
                    replace=replace_wrong,
                )
        except (StoreError, TimeoutError) as error:
            # A lost write only costs a recomputation later (DESIGN §2).
            logger.warning("state write-back failed: %s", error or "timed out")

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the background write-backs: before the store closes."""
        if self._write_backs:
            await asyncio.wait(set(self._write_backs), timeout=timeout)

    async def _model(self, job: Callable[[], T], long: bool = False) -> T:
        try:
            return await self.runtime.run(job, long)
        except Overloaded:
            raise  # a full model queue: a 503 with Retry-After, not a model failure
        except Exception as error:
            raise ModelError(str(error)) from error


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best of ``scores`` (M,), best first, ties in index order: exactly
    ``argsort(-scores, kind="stable")[:k]``, but sorting only the scores that reach the k-th best
    (a partition first) rather than all M."""
    negated = -scores
    if k >= negated.size:
        return np.argsort(negated, kind="stable")
    kth = np.partition(negated, k - 1)[k - 1]
    if np.isnan(kth):  # fewer than k comparable scores: NaNs go last, as argsort puts them
        return np.argsort(negated, kind="stable")[:k]
    reaching = np.flatnonzero(negated <= kth)  # ascending: ties stay in index order
    return reaching[np.argsort(negated[reaching], kind="stable")[:k]]


class _Unreachable(Exception):
    """The events a fold needs are no longer in the log."""
