"""Hot model rollout: load a new version while the old one serves, warm it, switch atomically.

One worker process, one :class:`Rollout`. The version served is a :class:`Serving` (runtime and
the ranker bound to it) in a :class:`ModelHolder`; a request reads the holder once and runs on
that version to the end, so a switch never mixes two versions in one response, and each
response names the version that scored it.

A rollout (to the version ``<model_dir>/LATEST`` names, polled every ``model_poll_seconds``):

1. load the version's programs off the event loop and run them once (program specialisation);
2. if its *state version* differs (another encoder or catalogue), warm it: the states of the
   most recently active users (:mod:`service.activity`) are encoded for the new encoder and
   stored under the new state version, one user at a time, the server's workers together
   encoding ``rollout_warm_duty`` of one CPU's time, so the old version keeps its latency. A
   fusion or scorer-only change keeps the state version, so every cached state stays valid and
   nothing is warmed;
3. switch: one assignment of the holder; once the replaced version's write-backs are drained,
   the heap is frozen again (:func:`service.heap.freeze_long_lived`);
4. after ``rollout_cleanup_delay_seconds``, if the version is still served, delete the cached
   states of every state version no worker serves (a background scan in batches, once per set of
   kept versions across workers and replicas:
   :meth:`service.stores.base.RolloutRecords.delete_states`).

A rollout that fails (an unreadable artefact, the store down during the warm-up) is retried
with backoff, ``rollout_retry_seconds`` doubling per failure up to :data:`RETRY_MAX_DOUBLINGS`
doublings, and the failure is forgotten when LATEST names another version.

What a worker serves is in the store: every :data:`ADVERTISE_SECONDS` it records the state
versions it serves or is warming, valid for :data:`ADVERTISE_TTL_SECONDS` (a killed worker's
record expires). A cleanup keeps every version advertised, so a fleet on mixed versions (a
worker whose rollout failed, another replica behind) keeps its states; it looks again until only
its own version is served.

Workers: each worker polls LATEST and rolls on its own; warm-up results are shared through the
store (a worker finds the states another already stored, and each walks the users in its own
order, so N workers split the warm-up rather than repeat it). ``POST /admin/model`` writes
LATEST and starts this worker's rollout at once; the others follow at their next poll. A
rollback is the same operation to an older version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from model.artifact import LATEST_FILE, MANIFEST_FILE, resolve_artifact_dir
from service.heap import freeze_long_lived
from service.metrics import Metrics
from service.model_queue import ModelQueue
from service.ranker import Ranker
from service.runtime import ModelRuntime, load_runtime
from service.settings import Settings
from service.stores.base import Store, StoreError

logger = logging.getLogger("service")

CLEANUP_BATCH = 1000
"""State keys examined per SCAN call of the cleanup."""
CLEANUP_PAUSE_SECONDS = 0.05
"""Pause between cleanup batches: the scan takes a few percent of a Redis node at most."""
RETIRE_DRAIN_SECONDS = 10.0
"""How long a replaced version's background state write-backs may take to finish."""
RETRY_MAX_DOUBLINGS = 6
"""A failed rollout's retry delay doubles per failure at most this often (5 s -> 320 s)."""
ADVERTISE_SECONDS = 5.0
"""How often a worker records the state versions it serves in the store."""
ADVERTISE_TTL_SECONDS = 30.0
"""How long that record holds unless renewed: a killed worker's versions are no longer kept by
a cleanup after this; a store outage shorter than it loses no worker's record."""
CLEANUP_RECHECK_SECONDS = ADVERTISE_TTL_SECONDS
"""While other versions are still served, the cleanup looks again after this (by then a killed
worker's record has expired)."""

Phase = Literal["serving", "loading", "warming", "failed"]


@dataclass(frozen=True)
class Serving:
    """One model version as requests use it."""

    runtime: ModelRuntime
    ranker: Ranker


class ModelHolder:
    """The version served now. Read once per request; replaced by one assignment."""

    def __init__(self, serving: Serving) -> None:
        self.current = serving

    def swap(self, serving: Serving) -> Serving:
        previous, self.current = self.current, serving
        return previous


@dataclass
class RolloutStatus:
    phase: Phase = "serving"
    target: str | None = None
    """The version being loaded or warmed (None while only serving)."""
    warm_total: int = 0
    warm_done: int = 0
    error: str | None = None
    """Why the last rollout failed (it is retried with backoff, and given up when LATEST
    names another version)."""
    attempts: int = 0
    """Failed attempts at the target so far."""
    history: list[str] = field(default_factory=list)
    """Versions switched to by this worker, oldest first."""


class UnknownVersion(ValueError):
    """No artefact of that version in the model directory."""


@dataclass(frozen=True)
class _Failure:
    version: str
    attempts: int
    retry_at: float
    """time.monotonic() from which it is tried again."""


class Rollout:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: Store,
        holder: ModelHolder,
        queue: ModelQueue,
        make_ranker: Callable[[ModelRuntime, Ranker | None], Ranker],
        prepare: Callable[[ModelRuntime], None],
    ) -> None:
        """``make_ranker(runtime, previous)`` builds the ranker of a new version (``previous``
        is the ranker it replaces when the state version is the same, to share its local
        states); ``prepare`` runs a loaded runtime once (program specialisation)."""
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.holder = holder
        self.queue = queue
        self.make_ranker = make_ranker
        self.prepare = prepare
        self.status = RolloutStatus(history=[holder.current.runtime.version])
        self._lock = asyncio.Lock()
        self._failure: _Failure | None = None
        self._warming: str | None = None
        """The state version being warmed (advertised as served: its states are kept)."""
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        """This worker's name in the store's record of what is served."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._poll: asyncio.Task[None] | None = None
        self._advertising: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Loading and first runs of a new version stay off the model thread that serves.
        self._loader = ThreadPoolExecutor(
            1,
            thread_name_prefix="ifa-rollout",
            # With OpenMP the thread count is per thread: the first runs use the served count.
            initializer=torch.set_num_threads,
            initargs=(settings.torch_threads,),
        )
        self._rng = random.Random(os.getpid())
        self._show(holder.current.runtime, active=True)

    # -- triggers -----------------------------------------------------------------------------

    def start(self) -> None:
        self._advertising = asyncio.create_task(self._advertise_serving())
        if self.settings.model_poll_seconds > 0 and self._latest_file() is not None:
            self._poll = asyncio.create_task(self._follow_latest())

    def _latest_file(self) -> Path | None:
        """``<model_dir>/LATEST``, or None when model_dir is one version's directory."""
        path = self.settings.model_dir / LATEST_FILE
        return path if not (self.settings.model_dir / MANIFEST_FILE).is_file() else None

    def latest_version(self) -> str | None:
        latest = self._latest_file()
        if latest is None:
            return None
        try:
            return resolve_artifact_dir(self.settings.model_dir).name
        except (OSError, ValueError) as error:
            logger.warning("cannot read %s: %s", latest, error)
            return None

    async def _follow_latest(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_seconds)
            await self.check_latest()

    async def check_latest(self) -> None:
        """Roll to the version LATEST names, unless it is served, being rolled to, or failed
        and not yet due for its retry."""
        version = await asyncio.get_running_loop().run_in_executor(
            self._loader, self.latest_version
        )
        if version is None or self._lock.locked():
            return
        failure = self._failure
        if failure is not None and failure.version != version:
            self._forget_failure()  # LATEST moved on: the failed version is not wanted now
        elif failure is not None and time.monotonic() < failure.retry_at:
            return
        if version != self.holder.current.runtime.version:
            await self.roll_to(version)

    def _forget_failure(self) -> None:
        self._failure = None
        status = self.status
        if status.phase == "failed":
            status.phase, status.target, status.error, status.attempts = "serving", None, None, 0

    def publish(self, version: str) -> None:
        """Point LATEST at ``version`` (which must be in the model directory): every worker
        follows it at its next poll. Raises :class:`UnknownVersion`, or OSError when the
        directory cannot be written (a read-only volume)."""
        from model.export import write_latest  # the exporter's atomic write, not its imports

        directory = self.settings.model_dir
        if self._latest_file() is None:
            raise UnknownVersion(f"{directory} is one version's directory, not an export root")
        if (
            Path(version).name != version
            or version.startswith(".")
            or not (directory / version / MANIFEST_FILE).is_file()
        ):
            raise UnknownVersion(f"no artefact {version!r} in {directory}")
        write_latest(directory, version)
        if self._failure is not None and self._failure.version != version:
            self._forget_failure()

    def start_check(self) -> None:
        """Check LATEST now, in the background (the admin call does not wait for a warm-up)."""
        self._spawn(self.check_latest())

    # -- the rollout --------------------------------------------------------------------------

    async def roll_to(self, version: str) -> None:
        """Load, warm and switch to ``version`` (one rollout at a time per worker)."""
        async with self._lock:
            current = self.holder.current
            if version == current.runtime.version:
                return
            started = time.perf_counter()
            status = self.status
            status.phase, status.target, status.error = "loading", version, None
            status.warm_total = status.warm_done = 0
            try:
                runtime = await self._load(version)
                await self._agree_layout(runtime)
                same_states = runtime.state_version == current.runtime.state_version
                ranker = self.make_ranker(runtime, current.ranker if same_states else None)
                if not same_states and self.settings.state_cache:  # nothing to warm without it
                    status.phase = "warming"
                    self._warming = runtime.state_version
                    await self.advertise()  # its states are kept from now on
                    await self._warm(ranker)
            except Exception as error:  # a bad artefact must not take the worker down
                self._warming = None
                self._fail(version, error)
                return
            self._warming = None
            self._failure = None
            status.attempts = 0
            previous = self.holder.swap(Serving(runtime, ranker))
            self._spawn(self.advertise())
            self._show(previous.runtime, active=False)
            self._show(runtime, active=True)
            self.metrics.rollouts.labels(outcome="switched").inc()
            status.phase, status.target = "serving", None
            status.history.append(version)
            logger.info(
                "switched from %s to %s in %.1f s (states %s, %d warmed)",
                previous.runtime.version, version, time.perf_counter() - started,
                "kept" if same_states else runtime.state_version, status.warm_done,
            )  # fmt: skip
            self._spawn(self._retire(previous))
            if not same_states:
                self._spawn(self._clean_up(runtime.state_version))

    def _fail(self, version: str, error: Exception) -> None:
        """Record a failed rollout to ``version`` and schedule its retry."""
        earlier = self._failure
        attempts = earlier.attempts + 1 if earlier is not None and earlier.version == version else 1
        delay = self.settings.rollout_retry_seconds * 2 ** min(attempts - 1, RETRY_MAX_DOUBLINGS)
        delay *= self._rng.uniform(0.8, 1.2)  # workers that failed together retry apart
        self._failure = _Failure(version, attempts, time.monotonic() + delay)
        status = self.status
        status.phase, status.attempts = "failed", attempts
        status.error = (
            f"{type(error).__name__}: {error} (attempt {attempts}, retried in {delay:.0f} s)"
        )
        self.metrics.rollouts.labels(outcome="failed").inc()
        logger.exception(
            "rollout to %s failed (attempt %d); still serving %s, retrying in %.0f s",
            version, attempts, self.holder.current.runtime.version, delay,
        )  # fmt: skip
        self._spawn(self._retry_after(delay))

    async def _retry_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.check_latest()

    async def _retire(self, previous: Serving) -> None:
        """Let the replaced version's write-backs finish, then freeze what the new one keeps
        alive (its objects were created after the last freeze)."""
        await previous.ranker.drain(RETIRE_DRAIN_SECONDS)
        del previous
        freeze_long_lived()

    async def _load(self, version: str) -> ModelRuntime:
        loop = asyncio.get_running_loop()
        settings = self.settings
        runtime = await loop.run_in_executor(
            self._loader,
            load_runtime,
            settings.model_dir / version,
            settings.program_format,
            settings.precision,
            self.queue,
            settings.model_workers,
        )
        await loop.run_in_executor(self._loader, self.prepare, runtime)
        return runtime

    async def _agree_layout(self, runtime: ModelRuntime) -> None:
        """Refuse (raise) a version that would misread the store's logs: an action list that
        lacks a name the store holds, or a max_history other than the store's; a version that
        extends the list appends its new names to the store's."""
        max_history = self.settings.resolved_max_history(runtime.trained_max_history)
        runtime.bind_layout(await self.store.agree_layout(runtime.actions, max_history))

    async def _warm(self, ranker: Ranker) -> None:
        """Store the new encoder's states of the most active users, at the duty cycle."""
        users = await self.store.active_users(self.settings.rollout_warm_users)
        # Each worker in its own order: concurrent workers mostly warm different users, and a
        # user another worker stored already is a cache hit here (no encoding).
        self._rng.shuffle(users)
        status, gauge = self.status, self.metrics.rollout_warm_users
        status.warm_total = len(users)
        gauge.labels(count="total").set(len(users))
        gauge.labels(count="done").set(0)
        # The workers of one server warm at once: together they take rollout_warm_duty.
        duty = self.settings.rollout_warm_duty / self.settings.resolved_workers()
        for user_id in users:
            started = time.perf_counter()
            try:
                await ranker.user_state(user_id)
            except StoreError as error:
                logger.warning("warm-up of a user skipped: %s", error)
            status.warm_done += 1
            gauge.labels(count="done").set(status.warm_done)
            busy = time.perf_counter() - started
            await asyncio.sleep(busy * (1.0 - duty) / duty)
        await ranker.drain(RETIRE_DRAIN_SECONDS)  # the last write-backs are stored

    async def _clean_up(self, state_version: str) -> None:
        """Delete the states of every version no worker serves; while other versions are still
        served (workers behind, or killed with their record not yet expired), look again after
        a record's lifetime."""
        await asyncio.sleep(self.settings.rollout_cleanup_delay_seconds)
        while self.holder.current.runtime.state_version == state_version:
            # (Rolled on or back since: that rollout cleans up.)
            try:
                keep = await self.store.served_state_versions() | {state_version}
                deleted = await self.store.delete_states(keep, CLEANUP_BATCH, CLEANUP_PAUSE_SECONDS)
            except StoreError as error:
                logger.warning("old states not deleted yet: %s", error)
            else:
                self.metrics.states_deleted.inc(deleted)
                if deleted:
                    logger.info("deleted %d cached states of state versions no worker serves "
                                "(kept %s)", deleted, ", ".join(sorted(keep)))  # fmt: skip
                if keep == {state_version}:
                    return
            await asyncio.sleep(
                max(self.settings.rollout_cleanup_delay_seconds, CLEANUP_RECHECK_SECONDS)
            )

    async def _advertise_serving(self) -> None:
        # Ends on the stop event as well as on cancellation: a cancel that lands inside a Redis
        # call can be absorbed there (seen as a shutdown that never finished), and the event
        # still ends the loop.
        while not self._stopping.is_set():
            await self.advertise()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), ADVERTISE_SECONDS)

    async def advertise(self) -> None:
        """Record the state versions this worker serves or warms (a store error is logged: the
        next renewal comes within ADVERTISE_SECONDS, well inside the record's lifetime)."""
        versions = {self.holder.current.runtime.state_version}
        if self._warming is not None:
            versions.add(self._warming)
        try:
            await self.store.advertise_serving(self.worker, versions, ADVERTISE_TTL_SECONDS)
        except StoreError as error:
            logger.warning("cannot record the versions this worker serves: %s", error)

    # -- bookkeeping --------------------------------------------------------------------------

    def _show(self, runtime: ModelRuntime, active: bool) -> None:
        self.metrics.model_info.labels(version=runtime.version).set(1 if active else 0)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel the poll, a rollout in progress, the cleanup and the drains of retired
        versions (a lost write-back only costs a recomputation)."""
        self._stopping.set()
        loops = [task for task in (self._poll, self._advertising) if task is not None]
        tasks = [*self._tasks, *loops]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loader.shutdown(wait=False)
