"""The loaded model as the service uses it: the exported encoder and scorer, the catalogue,
and the model queue their torch work runs through.

Featurisation (numpy lookups, microseconds) runs on the event loop; the torch methods
(``encode_history``, ``fold_events``, ``score``) run where :meth:`ModelRuntime.run` puts them
(:class:`service.model_queue.ModelQueue`: inline, or on the worker's model thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from model.artifact import ServingModel, load_artifact, load_manifest, resolve_artifact_dir
from model.catalogue import Catalogue
from model.features import FeatureSpec
from service.model_queue import ModelQueue
from service.state import UserState, advance, empty_state, fold, fold_reference_time, unfold
from service.stores.base import LayoutRecord, StoreError
from service.stores.layout import ActionMapping, LayoutMismatch, StoreLayout
from service.stores.records import EventLog

T = TypeVar("T")


@dataclass(frozen=True)
class Scored:
    probabilities: np.ndarray  # (M, 1 + A) float32: p(impression), then p(action | impression)
    scores: np.ndarray  # (M,) float32, the fused ranking score
    forward_seconds: float
    forward_cpu_seconds: float
    """CPU time of the worker thread: unlike wall time, not inflated by CPU contention."""


class ModelRuntime:
    """One model version, ready to encode histories and score candidate sets."""

    def __init__(
        self, model: ServingModel, queue: ModelQueue, directory: Path | None = None
    ) -> None:
        manifest = model.manifest
        self.model = model
        self.directory = directory
        """The artefact directory (its checkpoint serves /explain), when loaded from one."""
        self.catalogue: Catalogue = model.catalogue
        self.queue = queue
        self.version: str = str(manifest.version)
        self.state_version: str = str(manifest.state_version or manifest.version)
        """What cached states are keyed by: changes with the encoder and the catalogue only."""
        self.trained_max_history: int | None = manifest.max_history
        self.spec: FeatureSpec = model.spec
        self.actions: tuple[str, ...] = tuple(manifest.actions)
        self.stored_actions = ActionMapping.identity(self.actions)
        """This model's actions against the store's vocabulary (stored logs hold the store's
        indices); the identity until :meth:`bind_layout`, which every serving path runs first."""
        self._layout_bound = False
        self.objectives: tuple[str, ...] = tuple(manifest.objectives)
        """The model's vocabulary names /rank's probabilities and /events' actions (DESIGN §5)."""
        self.fusion: dict[str, float] = {
            str(name): float(weight) for name, weight in dict(manifest.fusion).items()
        }
        self.heads: int = int(manifest.heads)
        self.key_dim: int = int(manifest.key_dim)
        self.value_dim: int = int(manifest.value_dim)
        self.decay_rates = model.decay_rates.to(torch.float32)
        if self.decay_rates.shape != (self.heads,):
            raise ValueError(
                f"manifest has {len(self.decay_rates)} decay rates for {self.heads} heads"
            )

    async def run(self, job: Callable[[], T], long: bool = False) -> T:
        """Run torch work where the model queue says: inline, or on the model thread for
        ``long`` jobs and in thread mode (raises :class:`service.errors.Overloaded` when the
        worker's model queue is full)."""
        return await self.queue.run(job, long)

    def bind_layout(self, layout: StoreLayout) -> None:
        """Read and write stored actions through ``layout``, which accepted this model."""
        self.stored_actions = ActionMapping.bind(layout, self.actions)
        self._layout_bound = True

    async def agree_layout(self, store: LayoutRecord, max_history: int) -> ActionMapping:
        """The mapping onto the store's vocabulary, agreed with the store on first use where
        start-up could not reach it; raises :class:`StoreError` until it can (a model the store
        refuses included: this worker must not read or write the store's logs)."""
        if not self._layout_bound:
            try:
                self.bind_layout(await store.agree_layout(self.actions, max_history))
            except LayoutMismatch as error:
                raise StoreError(f"model {self.version} refused by the store: {error}") from error
        return self.stored_actions

    def empty_state(self) -> UserState:
        return empty_state(self.heads, self.key_dim, self.value_dim)

    # -- featurisation (cheap numpy, fine on the loop) ---------------------------------------

    def candidate_rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(M, F_item) rows and the (M,) known mask; unknown ids get OOV rows."""
        return self.catalogue.rows(item_ids)

    def user_row(self, user_id: int, profile: dict[str, int]) -> np.ndarray:
        """(F_user,) row from the id and the stored profile (missing attributes -> OOV)."""
        columns = {name: np.array([value], dtype=np.int64) for name, value in profile.items()}
        columns["user_id"] = np.array([user_id], dtype=np.int64)
        known = {name: col for name, col in columns.items() if name in self.spec.user_names}
        return self.spec.user_rows(known)[0]

    def event_rows(self, log: EventLog) -> np.ndarray:
        """(N, F_event) rows of logged events: their items' rows as resolved through the live
        catalogue when the log carries them, else through the base catalogue; their actions
        (the store's indices) mapped to the model's by name."""
        item_rows = log.item_rows
        if item_rows is None:
            item_rows, _ = self.catalogue.rows(log.item_ids)
        actions = self.stored_actions.model_actions(log.actions)
        return self.spec.event_rows(item_rows, actions, log.timestamps)

    # -- torch work (through run() only) ----------------------------------------------------------

    def encode_history(self, log: EventLog, start: int = 0) -> UserState:
        """The state of a log's window [start, log.end), from scratch, referenced to its newest
        event (``log`` holds those events)."""
        empty = replace(self.empty_state(), start=start, cursor=start, anchor=start)
        return self.fold_events(empty, log)

    def fold_events(self, state: UserState, log: EventLog) -> UserState:
        """The state with the events of ``log`` added; its cursor becomes ``log.end``."""
        if len(log) == 0:
            return replace(state, cursor=log.end)
        reference = fold_reference_time(state, log.timestamps)
        with torch.inference_mode():
            # The loader encodes very long histories in chunks, so memory stays bounded.
            s, z = self.model.encode(
                torch.from_numpy(self.event_rows(log)),
                torch.from_numpy(np.ascontiguousarray(log.timestamps)),
                reference,
            )
        return fold(state, (s.float(), z.float()), reference, log.end, self.decay_rates)

    def unfold_events(self, state: UserState, evicted: EventLog, start: int) -> UserState:
        """The state with the events of ``evicted`` (all in it) taken out; its window then starts
        at ``start``. Each is encoded relative to the state's reference time, so it is removed
        with exactly the decay weight it has in the state."""
        if len(evicted) == 0:
            return replace(state, start=start)
        with torch.inference_mode():
            s, z = self.model.encode(
                torch.from_numpy(self.event_rows(evicted)),
                torch.from_numpy(np.ascontiguousarray(evicted.timestamps)),
                state.reference_time,
            )
        return unfold(state, (s.float(), z.float()), start)

    def score(
        self,
        user_row: np.ndarray,
        candidate_rows: np.ndarray,
        state: UserState,
        request_time: float,
    ) -> Scored:
        """Score a candidate set against a state discounted to the request time."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        current = advance(state, request_time, self.decay_rates)
        with torch.inference_mode():
            probabilities, scores = self.model.score(
                torch.from_numpy(user_row),
                torch.from_numpy(np.ascontiguousarray(candidate_rows)),
                current.s,
                current.z,
            )
        return Scored(
            probabilities=probabilities.float().numpy(),
            scores=scores.float().numpy(),
            forward_seconds=time.perf_counter() - started,
            forward_cpu_seconds=time.thread_time() - started_cpu,
        )


class ModelDirectoryError(Exception):
    """The model directory is missing or unreadable; the message says what to run."""


def check_model_dir(model_dir: Path) -> None:
    """Raise :class:`ModelDirectoryError` (the cause chained) unless ``model_dir`` holds a
    readable manifest, itself or through ``LATEST``: checked before the server starts, so a
    first run without a model gets a sentence rather than a lifespan traceback."""
    try:
        load_manifest(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as error:  # missing, unreadable, malformed
        raise ModelDirectoryError(
            f"No model to serve in {str(model_dir)!r} ({error}). The service needs an exported "
            f"model: `make run` builds the demo model into artifacts/ and serves it, or build "
            f"one with `python -m model.demo --out {model_dir}` and start again (or point "
            f"--model-dir / IFA_MODEL_DIR at an export root that holds LATEST)."
        ) from error


def load_runtime(
    model_dir: Path, program_format: str, precision: str, queue: ModelQueue, model_threads: int
) -> ModelRuntime:
    """Load ``model_dir`` (an artefact directory, or an export root whose LATEST names one),
    with a program runner for each thread that calls the programs: the event loop (inline jobs)
    and each of ``model_threads`` (:func:`model.artifact.load_program_files`)."""
    directory = resolve_artifact_dir(model_dir)
    model = load_artifact(directory, program_format, precision, runners=model_threads + 1)
    return ModelRuntime(model, queue, directory)
