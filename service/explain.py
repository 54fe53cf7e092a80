"""/explain: the history events that drove one item's score, out of the user's whole window.

It takes the state a /rank would score with now (:meth:`service.ranker.Ranker.user_state`), reads
the events of that state's window [start, cursor) from the log, and weighs each one with the
network's own modules (:mod:`model.explain`), with the decay the served read applies. The weights
then reproduce the served read of every head, so the explanation is exact, not a proxy.

Cost: O(N) in the window (one log read, one embedding pass over N events) and an eager network
built from the artefact's checkpoint the first time a version is explained (whatever program
format serves /rank, the checkpoint is in every artefact). A debugging call, not a hot path: it
is rate-limited per worker (:class:`RateLimit`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import load_checkpoint
from model.explain import HeadAttention, combined_weights, head_attention, served_decay_weights
from model.nets.ifa import IFA
from service.ranker import Ranker
from service.runtime import ModelRuntime
from service.state import UserState
from service.stores.base import StoreError
from service.stores.records import EventLog

NETS_KEPT = 2
"""Eager networks kept per worker: the version served and the one before (a rollout's)."""


class ExplainUnavailable(RuntimeError):
    """The explanation cannot be computed now (no checkpoint, a degraded state)."""


@dataclass(frozen=True)
class Explanation:
    model_version: str
    user_id: int
    item_id: int
    request_time: float
    score: float
    probabilities: dict[str, float]
    state: UserState
    """The state the explanation is of (not yet advanced to the request time)."""
    log: EventLog
    """The window's events, in the order of ``attention``'s columns (by timestamp)."""
    event_digests: dict[int, str]
    attention: HeadAttention


class RateLimit:
    """A token bucket: ``rate`` calls per second on average, ``burst`` at once (per worker)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> float:
        """0 when a call may go ahead (a token is spent), else seconds until one may."""
        if self.rate <= 0:
            return float("inf")  # off
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class EagerNets:
    """Eager IFA networks by model version, loaded from the artefacts' checkpoints on demand."""

    def __init__(self) -> None:
        self._nets: OrderedDict[str, IFA] = OrderedDict()
        self._lock = threading.Lock()  # loads run on the model thread

    def get(self, runtime: ModelRuntime) -> IFA:
        with self._lock:
            net = self._nets.get(runtime.version)
            if net is None:
                if runtime.directory is None:
                    raise ExplainUnavailable("the model was not loaded from an artefact directory")
                path = runtime.directory / runtime.model.manifest.checkpoint_file
                try:
                    loaded = load_checkpoint(path).net
                except OSError as error:
                    raise ExplainUnavailable(f"no checkpoint to explain with: {error}") from error
                if not isinstance(loaded, IFA):
                    raise ExplainUnavailable(f"{path} does not hold an IFA network")
                net = loaded.eval()
                self._nets[runtime.version] = net
                while len(self._nets) > NETS_KEPT:
                    self._nets.popitem(last=False)
            self._nets.move_to_end(runtime.version)
            return net


async def explain(
    ranker: Ranker,
    nets: EagerNets,
    user_id: int,
    item_id: int,
    request_time: float | None = None,
    candidate_ids: Sequence[int] | None = None,
) -> Explanation:
    """Weigh every event of the user's window for ``item_id``, with the version ``ranker``
    serves (one version for the whole call, as for a /rank).

    The score is the item's among ``candidate_ids`` (which hold it), as the /rank of that set
    scores it: RAM makes a score depend on the other candidates. Without them it is the item's
    score in a set of its own."""
    runtime, store = ranker.runtime, ranker.store
    current, profile = await ranker.user_state(user_id)
    if current.outcome == "degraded":
        raise StoreError("the user's state is not available from the store now")
    state = current.state
    log = await store.read_events(user_id, state.start, state.cursor)
    if len(log) != state.cursor - state.start:
        # The log was cut between the state's read and this one (a burst of events).
        raise StoreError("the user's log moved on while it was read; retry")
    event_digests = await store.event_digests(user_id, state.start, state.cursor)
    when = time.time() if request_time is None else request_time
    # Features as the live catalogue has them now: an event whose item changed since it was
    # folded is weighed with its present features (the state keeps the old ones, DESIGN §2).
    candidates = list(candidate_ids) if candidate_ids is not None else [item_id]
    index = candidates.index(item_id)  # ValueError when the set does not hold the item
    candidate_rows = (await ranker.items.rows(np.array(candidates, dtype=np.int64))).rows
    user_row = runtime.user_row(user_id, profile)
    event_rows = runtime.event_rows(await ranker.items.with_item_rows(log))

    def weigh() -> tuple[HeadAttention, np.ndarray, np.float32]:
        net = nets.get(runtime)
        decay = served_decay_weights(
            torch.from_numpy(np.ascontiguousarray(log.timestamps)),
            state.reference_time,
            when,
            runtime.decay_rates,
        )
        user, candidate = torch.from_numpy(user_row), torch.from_numpy(candidate_rows[index])
        attention = head_attention(net, user, candidate, torch.from_numpy(event_rows), decay)
        scored = runtime.score(user_row, candidate_rows, state, when)
        return attention, scored.probabilities[index], scored.scores[index]

    attention, probabilities, score = await runtime.run(weigh, long=True)
    return Explanation(
        model_version=runtime.version,
        user_id=user_id,
        item_id=item_id,
        request_time=when,
        score=float(score),
        probabilities={
            name: float(p) for name, p in zip(runtime.objectives, probabilities, strict=True)
        },
        state=state,
        log=log,
        event_digests=event_digests,
        attention=attention,
    )


def top_events(
    explanation: Explanation, weights: Tensor, top: int, actions: tuple[str, ...]
) -> tuple[list[dict[str, object]], float]:
    """The ``top`` events of largest weight (best first) and the share of the weights' total
    they carry."""
    values = weights.detach().to(torch.float64).numpy()
    order = np.argsort(-values, kind="stable")[:top]
    log = explanation.log
    listed: list[dict[str, object]] = [
        {
            "position": int(log.positions[j]),
            "event_id": None,  # not stored: its digest is
            "event_digest": explanation.event_digests.get(int(log.positions[j])),
            "item_id": int(log.item_ids[j]),
            "action": _action_name(actions, int(log.actions[j])),
            "timestamp": float(log.timestamps[j]),
            "weight": float(values[j]),
        }
        for j in order.tolist()
    ]
    total = float(values.sum())
    share = float(values[order].sum() / total) if total > 0 else 0.0
    return listed, share


def _action_name(actions: tuple[str, ...], stored: int) -> str:
    """The name of a stored action index; "unknown" for one appended to the store's vocabulary
    after this version was loaded (by a newer version on another worker) or one no model had."""
    return actions[stored] if 0 <= stored < len(actions) else "unknown"


def render(explanation: Explanation, top: int, actions: tuple[str, ...]) -> dict[str, object]:
    """The JSON body of :class:`service.api.explain.ExplainResponse`."""
    attention = explanation.attention
    heads = []
    for h in range(attention.weights.shape[0]):
        events, share = top_events(explanation, attention.weights[h], top, actions)
        heads.append(
            {
                "head": h,
                "mass": float(attention.degree[h]),
                "listed_share": share,
                "events": events,
            }
        )
    events, share = top_events(explanation, combined_weights(attention), top, actions)
    return {
        "model_version": explanation.model_version,
        "user_id": explanation.user_id,
        "item_id": explanation.item_id,
        "request_time": explanation.request_time,
        "score": explanation.score,
        "probabilities": explanation.probabilities,
        "history_length": len(explanation.log),
        "heads": heads,
        "combined": {
            "mass": float(attention.degree.sum()),
            "listed_share": share,
            "events": events,
        },
    }
