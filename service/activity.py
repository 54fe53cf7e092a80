"""Which users are active: what a rollout warms first (:mod:`service.rollout`).

/rank and /events note their users here (a dict update, no I/O); a background task hands the
notes to the store once per :data:`FLUSH_SECONDS`, which keeps the most recent users
(:meth:`service.stores.base.RolloutRecords.record_activity`). One store write per worker per
flush, however many requests: the hot path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from service.stores.base import Store, StoreError

logger = logging.getLogger("service")

FLUSH_SECONDS = 1.0
MAX_PENDING_USERS = 100_000
"""Notes kept while the store does not answer; past it the oldest are dropped (they are a hint
of who to warm, not data)."""


class ActivityTracker:
    def __init__(self, store: Store, keep: int) -> None:
        self.store = store
        self.keep = keep
        self._seen: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    def touch(self, user_ids: Iterable[int]) -> None:
        if self.keep <= 0:
            return
        now = time.time()
        for user_id in user_ids:
            self._seen[user_id] = now
        if len(self._seen) > MAX_PENDING_USERS:
            for user_id in list(self._seen)[: len(self._seen) - MAX_PENDING_USERS]:
                del self._seen[user_id]

    async def flush(self) -> None:
        seen, self._seen = self._seen, {}
        try:
            await self.store.record_activity(seen, self.keep)
        except StoreError as error:
            logger.warning("activity not recorded: %s", error)
            self._seen = seen | self._seen  # the newer notes win

    def start(self) -> None:
        if self.keep > 0:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self.flush()
