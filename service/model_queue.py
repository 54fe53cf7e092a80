"""The worker's model thread behind a bounded, measured queue.

Torch work (encode, fold, score) runs on one thread per worker process, off the event loop. A
burst of requests then queues there; the queue is bounded so that a worker sheds load (503 with
Retry-After, :class:`service.errors.Overloaded`) instead of making every request wait behind a
backlog it cannot clear, and each job's wait is measured (the ``model_queue`` stage).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service.errors import Overloaded

T = TypeVar("T")


class ModelQueue:
    def __init__(
        self,
        executor: ThreadPoolExecutor,
        limit: int,
        on_wait: Callable[[float], None] = lambda seconds: None,
        on_depth: Callable[[int], None] = lambda depth: None,
    ) -> None:
        self.executor = executor
        self.limit = limit
        self._on_wait = on_wait
        self._on_depth = on_depth
        self._pending = 0
        """Jobs submitted and not finished; touched on the event loop only."""

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the model thread; raise :class:`Overloaded` when ``limit`` jobs are
        already pending, so the caller's request is shed before it queues."""
        if self._pending >= self.limit:
            raise Overloaded(
                f"model queue full ({self.limit} jobs pending in this worker); retry shortly"
            )
        submitted = time.perf_counter()

        def timed() -> tuple[T, float]:
            waited = time.perf_counter() - submitted
            return job(), waited

        self._pending += 1
        self._on_depth(self._pending)
        try:
            result, waited = await asyncio.get_running_loop().run_in_executor(
                self.executor, timed
            )
        finally:
            self._pending -= 1
            self._on_depth(self._pending)
        self._on_wait(waited)
        return result
