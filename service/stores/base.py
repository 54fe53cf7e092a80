"""The store interface: a behaviour log (idempotent appends, reads after a cursor, profiles),
a state cache (compare-and-set on the cursor, TTL, keys by model version and user) and an item
table (raw item attributes that override and extend the model's catalogue).

Cursors are log positions, not timestamps: the state with window [start, c) is a pure function of
the events the user's log received at those positions, whatever their timestamps. An event that
arrives late with an old timestamp gets the next position, so it is folded in by the next read like
any other (with its own decay weight), and nothing older than the cursor is ever missed.

Positions are absolute and never reused: a log bounded by :class:`HistoryLimits` drops its oldest
records, after which it holds positions [log_start, log_length).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.stores.layout import StoreLayout
from service.stores.records import EventLog

ItemAttributes = dict[str, int]
"""An item's raw attributes by field name (``category``, ``author``, ...), as posted: raw values,
featurised under whichever model serves (a value outside its vocabulary is that field's OOV)."""


class StoreError(RuntimeError):
    """The store could not be reached or refused an operation."""


class ItemsUnavailable(StoreError):
    """A bulk item lookup that reached only part of the item table (on a cluster, a node that
    failed, or is left alone for a moment after failing): ``found`` holds what was read,
    ``unavailable[i]`` whether the i-th id could not be."""

    def __init__(
        self, message: str, found: list[ItemAttributes | None], unavailable: list[bool]
    ) -> None:
        super().__init__(message)
        self.found = found
        self.unavailable = unavailable


@dataclass(frozen=True)
class NewEvent:
    """One behaviour event as ingested; ``action`` indexes the store's action vocabulary
    (:class:`~service.stores.layout.StoreLayout`)."""

    event_id: str
    user_id: int
    item_id: int
    action: int
    timestamp: float


@dataclass(frozen=True)
class HistoryLimits:
    """What a store keeps per user (every store implements the same bounds)."""

    max_history: int = 1000
    """The state's window: the most recent max_history events by log position."""
    dedup_window: int = 512
    """Event digests remembered: those of the last dedup_window events appended
    (:mod:`service.stores.idempotency`)."""
    dedup_seconds: int = 3600
    """And for this long at most: a retry more than dedup_seconds after its event is new."""
    retention_seconds: int = 30 * 86400
    """A user's log, digests, meta and profile are dropped after this long without a write."""

    @property
    def keep(self) -> int:
        """Records a log keeps: the window and a quarter window more, so that a cached state up
        to max_history / 4 events behind still finds the events it must fold out (one further
        behind is re-encoded: a user who posted that many events between two ranks). A full log
        is a ring of exactly this many records. A quarter, not a half: at 20 B a record it keeps
        a user at the cap within 48 KiB of Redis with the channel's larger state."""
        return self.max_history + (self.max_history + 3) // 4


@dataclass(frozen=True)
class AppendResult:
    accepted: int
    duplicates: int


@dataclass(frozen=True)
class UserSnapshot:
    """What a rank request needs from the store, read in one round trip."""

    state: bytes | None
    """The cached state blob for the model version, or None on a miss."""
    profile: dict[str, int]
    log_length: int
    """Events the user's log received (its end position): a state whose cursor is smaller is
    stale, one whose cursor is larger is wrong (the log was truncated or restored)."""
    log_start: int = 0
    """First log position the log still holds; events before it were trimmed."""


@dataclass(frozen=True)
class SeedHistories:
    """Whole histories to preload, user by user (the demo world's first run).

    Records of user ``user_ids[u]`` are ``records[bounds[u]:bounds[u + 1]]``.
    """

    user_ids: np.ndarray  # (U,) int64
    bounds: np.ndarray  # (U + 1,) int64
    records: np.ndarray  # (E,) EVENT_RECORD
    profiles: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class UserCount:
    """Users that have a behaviour log; ``complete`` is False when counting stopped early."""

    users: int
    complete: bool


class BehaviourLog(Protocol):
    async def append_events(self, events: Sequence[NewEvent]) -> AppendResult:
        """Append each event whose id the user's log does not remember; the rest are duplicates.
        Refreshes the user's retention (``HistoryLimits.retention_seconds``)."""
        ...

    async def read_events(self, user_id: int, cursor: int, stop: int | None = None) -> EventLog:
        """Events at log positions [max(cursor, log start), min(stop, log end)), sorted by
        timestamp, with their positions; ``end`` is the log length."""
        ...

    async def event_digests(self, user_id: int, start: int, stop: int) -> dict[int, str]:
        """Log position -> event-id digest (hex) of the events at positions [start, stop) still
        remembered for idempotency: for /explain, not for the hot path."""
        ...

    async def put_profile(self, user_id: int, attributes: Mapping[str, int]) -> None: ...

    async def seed(self, histories: SeedHistories) -> int:
        """Preload histories of users that have no log yet; returns the users written."""
        ...

    async def count_users(self, budget: int) -> UserCount:
        """Users with a log, examining about ``budget`` keys at most: it is logged at start,
        which must not wait on a huge keyspace."""
        ...


class StateCache(Protocol):
    async def put_state(
        self,
        version: str,
        user_id: int,
        blob: bytes,
        cursor: int,
        ttl_seconds: int,
        replace: bool = False,
    ) -> bool:
        """Store the state unless the cached one already has a cursor ≥ ``cursor``.

        The compare-and-set keeps a slow writer from replacing a newer state with an older one;
        returns whether this write won. ``replace`` writes anyway: the cached state was found
        wrong (corrupt, or ahead of the log), so its cursor must not win.
        """
        ...


class RolloutRecords(Protocol):
    """What a model rollout needs from the store: who is active (whose states to warm for a new
    encoder) and the removal of the states of encoders no longer served."""

    async def record_activity(self, seen: Mapping[int, float], keep: int) -> None:
        """Note users' latest activity (unix seconds); the store keeps the ``keep`` most recent
        users (and at most as many more), so the record stays bounded."""
        ...

    async def active_users(self, count: int) -> list[int]:
        """Up to ``count`` users, most recently active first."""
        ...

    async def advertise_serving(
        self, worker: str, state_versions: Collection[str], ttl_seconds: float
    ) -> None:
        """Record the state versions ``worker`` serves or is warming, for ``ttl_seconds``: a
        worker that stops renewing it (stopped, killed) drops out when it expires."""
        ...

    async def served_state_versions(self) -> set[str]:
        """The state versions some worker advertised and whose record has not expired."""
        ...

    async def delete_states(
        self, keep_versions: Collection[str], batch: int, pause_seconds: float
    ) -> int:
        """Delete every cached state of a version not in ``keep_versions``, ``batch`` keys at a
        time with a pause between batches; returns the states deleted. Once per set of kept
        versions however many workers ask (they all do after a rollout)."""
        ...


class ItemTable(Protocol):
    async def put_items(self, items: Mapping[int, Mapping[str, int]]) -> None:
        """Upsert items: each id's attributes are replaced by the ones given."""
        ...

    async def get_items(self, item_ids: Sequence[int]) -> list[ItemAttributes | None]:
        """The stored attributes of each id, in order; None for an id the table does not hold.
        One round trip however many ids (one per node, in parallel, on a cluster)."""
        ...


class LayoutRecord(Protocol):
    async def agree_layout(self, actions: Sequence[str], max_history: int) -> StoreLayout:
        """Apply :func:`service.stores.layout.reconcile` to the store's layout record
        atomically and return the record after it; raises
        :class:`~service.stores.layout.LayoutMismatch` (the record unchanged) for a model or a
        worker that would misread the logs."""
        ...


class Store(BehaviourLog, StateCache, RolloutRecords, ItemTable, LayoutRecord, Protocol):
    async def snapshot(self, version: str, user_id: int, ttl_seconds: int) -> UserSnapshot:
        """The cached state, profile and log bounds of a user. The state's TTL is refreshed once
        less than half of it is left (so that reads do not write)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""
        ...

    async def close(self) -> None: ...
