"""The embedded store: the behaviour log and state cache in this process's memory.

Every method runs to completion without awaiting, so on one event loop each is atomic: the
idempotent append and the compare-and-set need no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from service.stores.base import (
    AppendResult,
    HistoryLimits,
    ItemAttributes,
    NewEvent,
    SeedHistories,
    UserCount,
    UserSnapshot,
)
from service.stores.idempotency import event_digest
from service.stores.layout import StoreLayout, reconcile
from service.stores.records import RECORD_BYTES, EventLog, pack_record, unpack_log

_SWEEP_EVERY = 4096
"""Puts between sweeps of expired states, so that the cache of idle users does not grow forever."""


@dataclass
class _CachedState:
    blob: bytes
    cursor: int
    expires_at: float


class MemoryStore:
    def __init__(
        self, clock: Callable[[], float] | None = None, limits: HistoryLimits | None = None
    ) -> None:
        self._clock = clock or time.monotonic
        self.limits = limits or HistoryLimits()
        self._logs: dict[int, bytearray] = {}
        self._starts: dict[int, int] = {}
        """Log position of each log's first record (0 until the log is trimmed)."""
        self._digests: dict[int, dict[bytes, tuple[int, int]]] = {}
        """Recent event-id digests -> (log position, second appended), in position order."""
        self._written: dict[int, float] = {}
        """Clock time of each user's latest append (retention)."""
        self._profiles: dict[int, dict[str, int]] = {}
        self._states: dict[tuple[str, int], _CachedState] = {}
        self._puts = 0
        self._activity: dict[int, float] = {}
        """User -> latest activity (unix seconds), about the most recent ``keep`` users."""
        self._serving: dict[str, tuple[frozenset[str], float]] = {}
        """Worker -> (state versions it serves or warms, until when the record holds)."""
        self._items: dict[int, ItemAttributes] = {}
        self._layout: StoreLayout | None = None

    # -- behaviour log ----------------------------------------------------------------------

    async def append_events(self, events: Sequence[NewEvent]) -> AppendResult:
        accepted = 0
        clock = self._clock()
        now = int(clock)
        touched: set[int] = set()
        for event in events:
            self._expire_if_idle(event.user_id)
            seen = self._digests.setdefault(event.user_id, {})
            digest = event_digest(event.event_id)
            if self._remembered(event.user_id, seen.get(digest), now):
                continue
            log = self._logs.setdefault(event.user_id, bytearray())
            seen.pop(digest, None)  # re-inserted last: the dict stays in position order
            seen[digest] = (self._end(event.user_id), now)
            log += pack_record(event.item_id, event.action, event.timestamp)
            touched.add(event.user_id)
            accepted += 1
        for user_id in touched:
            self._bound(user_id)
            self._written[user_id] = clock
        return AppendResult(accepted=accepted, duplicates=len(events) - accepted)

    def _remembered(self, user_id: int, found: tuple[int, int] | None, now: int) -> bool:
        """Whether a digest found at (position, stamp) still makes its event a duplicate."""
        if found is None:
            return False
        position, stamp = found
        in_window = position >= self._end(user_id) - self.limits.dedup_window
        # No empty slots here (unlike a packed string): stamp 0 is a time, on a monotonic clock.
        return in_window and now - stamp < self.limits.dedup_seconds

    def _end(self, user_id: int) -> int:
        return self._starts.get(user_id, 0) + len(self._logs.get(user_id, b"")) // RECORD_BYTES

    def _bound(self, user_id: int) -> None:
        """Forget digests older than the dedup window; keep the last ``limits.keep`` records of
        the log (the Redis store keeps the same, as a ring)."""
        end, keep = self._end(user_id), self.limits.keep
        seen = self._digests[user_id]
        oldest_kept = end - self.limits.dedup_window
        while seen and next(iter(seen.values()))[0] < oldest_kept:
            del seen[next(iter(seen))]
        log = self._logs[user_id]
        records = len(log) // RECORD_BYTES
        if records > keep:
            del log[: (records - keep) * RECORD_BYTES]
            self._starts[user_id] = end - keep

    def _expire_if_idle(self, user_id: int) -> None:
        """Drop a user's log, digests, start and profile once nothing was appended to it for
        ``limits.retention_seconds`` (as their TTL does in Redis)."""
        written = self._written.get(user_id)
        if written is not None and self._clock() - written >= self.limits.retention_seconds:
            for table in (self._logs, self._starts, self._digests, self._profiles, self._written):
                table.pop(user_id, None)

    async def read_events(self, user_id: int, cursor: int, stop: int | None = None) -> EventLog:
        self._expire_if_idle(user_id)
        log = self._logs.get(user_id, bytearray())
        start, end = self._starts.get(user_id, 0), self._end(user_id)
        first, last = max(cursor, start), end if stop is None else max(min(stop, end), 0)
        data = bytes(log[(first - start) * RECORD_BYTES : max(last - start, 0) * RECORD_BYTES])
        return unpack_log(data, end=end, start=first)

    async def event_digests(self, user_id: int, start: int, stop: int) -> dict[int, str]:
        self._expire_if_idle(user_id)
        seen, now = self._digests.get(user_id, {}), int(self._clock())
        return {
            position: digest.hex()
            for digest, (position, stamp) in seen.items()
            if start <= position < stop and self._remembered(user_id, (position, stamp), now)
        }

    async def put_profile(self, user_id: int, attributes: Mapping[str, int]) -> None:
        self._expire_if_idle(user_id)
        self._written.setdefault(user_id, self._clock())
        self._profiles.setdefault(user_id, {}).update({k: int(v) for k, v in attributes.items()})

    async def seed(self, histories: SeedHistories) -> int:
        written = 0
        for u, user_id in enumerate(histories.user_ids.tolist()):
            if user_id in self._logs:
                continue
            start, stop = histories.bounds[u], histories.bounds[u + 1]
            self._logs[user_id] = bytearray(histories.records[start:stop].tobytes())
            self._written[user_id] = self._clock()
            written += 1
        for user_id, profile in histories.profiles.items():
            await self.put_profile(user_id, profile)
        return written

    async def count_users(self, budget: int) -> UserCount:
        return UserCount(users=len(self._logs), complete=True)

    # -- state cache ------------------------------------------------------------------------

    async def put_state(
        self,
        version: str,
        user_id: int,
        blob: bytes,
        cursor: int,
        ttl_seconds: int,
        replace: bool = False,
    ) -> bool:
        now = self._clock()
        key = (version, user_id)
        current = self._states.get(key)
        fresh = current is not None and current.expires_at > now
        if not replace and fresh and current is not None and current.cursor >= cursor:
            return False
        self._states[key] = _CachedState(blob, cursor, now + ttl_seconds)
        self._puts += 1
        if self._puts % _SWEEP_EVERY == 0:
            self._sweep(now)
        return True

    async def snapshot(self, version: str, user_id: int, ttl_seconds: int) -> UserSnapshot:
        self._expire_if_idle(user_id)
        now = self._clock()
        cached = self._states.get((version, user_id))
        blob: bytes | None = None
        if cached is not None and cached.expires_at > now:
            if (cached.expires_at - now) * 2 < ttl_seconds:
                cached.expires_at = now + ttl_seconds
            blob = cached.blob
        return UserSnapshot(
            state=blob,
            profile=dict(self._profiles.get(user_id, {})),
            log_length=self._end(user_id),
            log_start=self._starts.get(user_id, 0),
        )

    # -- rollout records --------------------------------------------------------------------

    async def record_activity(self, seen: Mapping[int, float], keep: int) -> None:
        self._activity.update(seen)
        if len(self._activity) > 2 * keep:  # trimmed now and then, not on every call
            recent = sorted(self._activity.items(), key=lambda item: -item[1])[:keep]
            self._activity = dict(recent)

    async def active_users(self, count: int) -> list[int]:
        recent = sorted(self._activity.items(), key=lambda item: -item[1])[:count]
        return [user_id for user_id, _ in recent]

    async def advertise_serving(
        self, worker: str, state_versions: Collection[str], ttl_seconds: float
    ) -> None:
        self._serving[worker] = (frozenset(state_versions), self._clock() + ttl_seconds)

    async def served_state_versions(self) -> set[str]:
        now = self._clock()
        return {v for versions, until in self._serving.values() if until > now for v in versions}

    async def delete_states(
        self, keep_versions: Collection[str], batch: int, pause_seconds: float
    ) -> int:
        # One process, no awaits: nothing can interleave, so no batches are needed.
        stale = [key for key in self._states if key[0] not in keep_versions]
        for key in stale:
            del self._states[key]
        return len(stale)

    def _sweep(self, now: float) -> None:
        expired = [key for key, cached in self._states.items() if cached.expires_at <= now]
        for key in expired:
            del self._states[key]
        for user_id in list(self._written):
            self._expire_if_idle(user_id)

    # -- item table -------------------------------------------------------------------------

    async def put_items(self, items: Mapping[int, Mapping[str, int]]) -> None:
        for item_id, attributes in items.items():
            self._items[int(item_id)] = {name: int(v) for name, v in attributes.items()}

    async def get_items(self, item_ids: Sequence[int]) -> list[ItemAttributes | None]:
        # Copies: a caller must not be able to change the table through what it read.
        found = (self._items.get(item_id) for item_id in item_ids)
        return [dict(attributes) if attributes is not None else None for attributes in found]

    # -- layout record ----------------------------------------------------------------------

    async def agree_layout(self, actions: Sequence[str], max_history: int) -> StoreLayout:
        self._layout = reconcile(self._layout, actions, max_history)
        return self._layout

    # -- lifecycle --------------------------------------------------------------------------

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
