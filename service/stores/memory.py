"""The embedded store: the behaviour log and state cache in this process's memory.

Every method runs to completion without awaiting, so on one event loop each is atomic: the
idempotent append and the compare-and-set need no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from service.stores.base import AppendResult, NewEvent, SeedHistories, UserCount, UserSnapshot
from service.stores.records import RECORD_BYTES, EventLog, pack_record, unpack_log

_SWEEP_EVERY = 4096
"""Puts between sweeps of expired states, so that the cache of idle users does not grow forever."""


@dataclass
class _CachedState:
    blob: bytes
    cursor: int
    expires_at: float


class MemoryStore:
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._logs: dict[int, bytearray] = {}
        self._event_ids: dict[int, set[str]] = {}
        self._profiles: dict[int, dict[str, int]] = {}
        self._states: dict[tuple[str, int], _CachedState] = {}
        self._puts = 0

    # -- behaviour log ----------------------------------------------------------------------

    async def append_events(self, events: Sequence[NewEvent]) -> AppendResult:
        accepted = 0
        for event in events:
            seen = self._event_ids.setdefault(event.user_id, set())
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            log = self._logs.setdefault(event.user_id, bytearray())
            log += pack_record(event.item_id, event.action, event.timestamp)
            accepted += 1
        return AppendResult(accepted=accepted, duplicates=len(events) - accepted)

    async def read_events(self, user_id: int, cursor: int) -> EventLog:
        log = self._logs.get(user_id, bytearray())
        return unpack_log(bytes(log[cursor * RECORD_BYTES :]), end=len(log) // RECORD_BYTES)

    async def put_profile(self, user_id: int, attributes: Mapping[str, int]) -> None:
        self._profiles.setdefault(user_id, {}).update({k: int(v) for k, v in attributes.items()})

    async def seed(self, histories: SeedHistories) -> int:
        written = 0
        for u, user_id in enumerate(histories.user_ids.tolist()):
            if user_id in self._logs:
                continue
            start, stop = histories.bounds[u], histories.bounds[u + 1]
            self._logs[user_id] = bytearray(histories.records[start:stop].tobytes())
            written += 1
        for user_id, profile in histories.profiles.items():
            await self.put_profile(user_id, profile)
        return written

    async def count_users(self, budget: int) -> UserCount:
        return UserCount(users=len(self._logs), complete=True)

    # -- state cache ------------------------------------------------------------------------

    async def put_state(
        self, version: str, user_id: int, blob: bytes, cursor: int, ttl_seconds: int
    ) -> bool:
        now = self._clock()
        key = (version, user_id)
        current = self._states.get(key)
        if current is not None and current.expires_at > now and current.cursor >= cursor:
            return False
        self._states[key] = _CachedState(blob, cursor, now + ttl_seconds)
        self._puts += 1
        if self._puts % _SWEEP_EVERY == 0:
            self._sweep(now)
        return True

    async def snapshot(self, version: str, user_id: int, ttl_seconds: int) -> UserSnapshot:
        now = self._clock()
        cached = self._states.get((version, user_id))
        blob: bytes | None = None
        if cached is not None and cached.expires_at > now:
            cached.expires_at = now + ttl_seconds
            blob = cached.blob
        return UserSnapshot(
            state=blob,
            profile=dict(self._profiles.get(user_id, {})),
            log_length=len(self._logs.get(user_id, b"")) // RECORD_BYTES,
        )

    def _sweep(self, now: float) -> None:
        expired = [key for key, cached in self._states.items() if cached.expires_at <= now]
        for key in expired:
            del self._states[key]

    # -- lifecycle --------------------------------------------------------------------------

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
