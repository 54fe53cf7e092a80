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
3. switch: one assignment of the holder;
4. after ``rollout_cleanup_delay_seconds``, if the version is still served, delete the cached
   states of every other state version (a background scan in batches, once per version
   across workers and replicas: :meth:`service.stores.base.RolloutRecords.delete_states`).

Workers: each worker polls LATEST and rolls on its own; warm-up results are shared through the
store (a worker finds the states another already stored, and each walks the users in its own
order, so N workers split the warm-up rather than repeat it). ``POST /admin/model`` writes
LATEST and starts this worker's rollout at once; the others follow at their next poll. A
rollback is the same operation to an older version.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from model.artifact import LATEST_FILE, MANIFEST_FILE, resolve_artifact_dir
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
    """Why the last rollout failed (it is retried when LATEST changes again)."""
    history: list[str] = field(default_factory=list)
    """Versions switched to by this worker, oldest first."""


class UnknownVersion(ValueError):
    """No artefact of that version in the model directory."""


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
        self._failed: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._poll: asyncio.Task[None] | None = None
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
        """Roll to the version LATEST names, unless it is served, or failed already."""
        version = await asyncio.get_running_loop().run_in_executor(
            self._loader, self.latest_version
        )
        if version is None or version == self._failed or self._lock.locked():
            return
        if version != self.holder.current.runtime.version:
            await self.roll_to(version)

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
        self._failed = None

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
                    await self._warm(ranker)
            except Exception as error:  # a bad artefact must not take the worker down
                self._failed = version
                status.phase, status.error = "failed", f"{type(error).__name__}: {error}"
                self.metrics.rollouts.labels(outcome="failed").inc()
                logger.exception("rollout to %s failed; still serving %s",
                                 version, current.runtime.version)  # fmt: skip
                return
            previous = self.holder.swap(Serving(runtime, ranker))
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
            self._spawn(previous.ranker.drain(RETIRE_DRAIN_SECONDS))
            if not same_states:
                self._spawn(self._clean_up(runtime.state_version))

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
        await asyncio.sleep(self.settings.rollout_cleanup_delay_seconds)
        if self.holder.current.runtime.state_version != state_version:
            return  # rolled on (or back) since: that rollout cleans up
        try:
            deleted = await self.store.delete_states(
                state_version, CLEANUP_BATCH, CLEANUP_PAUSE_SECONDS
            )
        except StoreError as error:
            logger.warning("old states not deleted: %s", error)
            return
        self.metrics.states_deleted.inc(deleted)
        if deleted:
            logger.info("deleted %d cached states of older state versions", deleted)

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
        tasks = [*self._tasks, *([self._poll] if self._poll is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loader.shutdown(wait=False)
