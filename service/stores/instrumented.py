"""A store wrapper that times every operation and counts failures, whatever the backend; a
client's internal fault on a torn-down connection becomes the :class:`StoreError` it is."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager

from service.metrics import Metrics
from service.stores.base import (
    AppendResult,
    ItemAttributes,
    NewEvent,
    SeedHistories,
    Store,
    StoreError,
    UserCount,
    UserSnapshot,
)
from service.stores.layout import StoreLayout
from service.stores.records import EventLog
from service.stores.redis_client import torn_connection


class InstrumentedStore:
    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    @asynccontextmanager
    async def _measured(self, operation: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            yield
        except AttributeError as error:
            self.metrics.store_errors.labels(operation=operation).inc()
            if torn_connection(error):
                raise StoreError(f"{operation}: connection torn down mid-command") from error
            raise
        except BaseException:
            self.metrics.store_errors.labels(operation=operation).inc()
            raise
        finally:
            self.metrics.store_duration.labels(operation=operation).observe(
                time.perf_counter() - started
            )

    async def append_events(self, events: Sequence[NewEvent]) -> AppendResult:
        async with self._measured("append_events"):
            return await self.inner.append_events(events)

    async def read_events(self, user_id: int, cursor: int, stop: int | None = None) -> EventLog:
        async with self._measured("read_events"):
            return await self.inner.read_events(user_id, cursor, stop)

    async def event_digests(self, user_id: int, start: int, stop: int) -> dict[int, str]:
        async with self._measured("event_digests"):
            return await self.inner.event_digests(user_id, start, stop)

    async def put_profile(self, user_id: int, attributes: Mapping[str, int]) -> None:
        async with self._measured("put_profile"):
            await self.inner.put_profile(user_id, attributes)

    async def seed(self, histories: SeedHistories) -> int:
        async with self._measured("seed"):
            return await self.inner.seed(histories)

    async def count_users(self, budget: int) -> UserCount:
        async with self._measured("count_users"):
            return await self.inner.count_users(budget)

    async def put_items(self, items: Mapping[int, Mapping[str, int]]) -> None:
        async with self._measured("put_items"):
            await self.inner.put_items(items)

    async def get_items(self, item_ids: Sequence[int]) -> list[ItemAttributes | None]:
        async with self._measured("get_items"):
            return await self.inner.get_items(item_ids)

    async def put_state(
        self,
        version: str,
        user_id: int,
        blob: bytes,
        cursor: int,
        ttl_seconds: int,
        replace: bool = False,
    ) -> bool:
        async with self._measured("put_state"):
            return await self.inner.put_state(version, user_id, blob, cursor, ttl_seconds, replace)

    async def record_activity(self, seen: Mapping[int, float], keep: int) -> None:
        async with self._measured("record_activity"):
            await self.inner.record_activity(seen, keep)

    async def active_users(self, count: int) -> list[int]:
        async with self._measured("active_users"):
            return await self.inner.active_users(count)

    async def advertise_serving(
        self, worker: str, state_versions: Collection[str], ttl_seconds: float
    ) -> None:
        async with self._measured("advertise_serving"):
            await self.inner.advertise_serving(worker, state_versions, ttl_seconds)

    async def served_state_versions(self) -> set[str]:
        async with self._measured("served_state_versions"):
            return await self.inner.served_state_versions()

    async def delete_states(
        self, keep_versions: Collection[str], batch: int, pause_seconds: float
    ) -> int:
        async with self._measured("delete_states"):
            return await self.inner.delete_states(keep_versions, batch, pause_seconds)

    async def snapshot(self, version: str, user_id: int, ttl_seconds: int) -> UserSnapshot:
        async with self._measured("snapshot"):
            return await self.inner.snapshot(version, user_id, ttl_seconds)

    async def agree_layout(self, actions: Sequence[str], max_history: int) -> StoreLayout:
        async with self._measured("agree_layout"):
            return await self.inner.agree_layout(actions, max_history)

    async def ping(self) -> None:
        async with self._measured("ping"):
            await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
