"""Where a worker runs its torch work: inline on the event loop, or on its model thread behind a
bounded, measured queue.

Inline (the default, ``model_execution=inline``) runs the scorer and folds, a few milliseconds
each and bounded by the candidate cap and the history window, directly on the event loop: one
busy thread per worker, so N workers on N cores never oversubscribe them, and no job pays for a
thread hand-off and the GIL. Measured in results/capacity.md, this is what lets two workers on
two cores hold the 50 ms p99 at twice the single worker's rate; with a model thread per worker,
four busy threads shared two cores and the tail grew from the waits between them.

Whole-history encodes (a cache miss, time growing with the history) always go to the model
thread, so one cold user cannot stall the loop; ``model_execution=thread`` sends every job
there. The queue is bounded so that a worker sheds load (503 with Retry-After,
:class:`service.errors.Overloaded`) instead of making every request wait behind a backlog it
cannot clear, and each job's wait is measured (the ``model_queue`` stage).
"""

from __future__ import annotations

import asyncio
import contextlib
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
        inline: bool = True,
        on_wait: Callable[[float], None] = lambda seconds: None,
        on_depth: Callable[[int], None] = lambda depth: None,
    ) -> None:
        self.executor = executor
        self.limit = limit
        self.inline = inline
        self._on_wait = on_wait
        self._on_depth = on_depth
        self._pending = 0
        """Jobs submitted and not ended (a cancelled caller's job included); touched on the
        event loop only."""

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, job: Callable[[], T], long: bool = False) -> T:
        """Run ``job``: inline where this queue runs jobs inline and the job is not ``long``
        (its time grows with the history), otherwise on the model thread, raising
        :class:`Overloaded` when ``limit`` jobs are already pending there, so the caller's
        request is shed before it queues."""
        if self.inline and not long:
            self._on_wait(0.0)  # no queue: the stage records that nothing was waited for
            return job()
        if self._pending >= self.limit:
            raise Overloaded(
                f"model queue full ({self.limit} jobs pending in this worker); retry shortly"
            )
        submitted = time.perf_counter()

        def timed() -> tuple[T, float]:
            waited = time.perf_counter() - submitted
            return job(), waited

        loop = asyncio.get_running_loop()
        future = self.executor.submit(timed)
        self._pending += 1
        self._on_depth(self._pending)
        # Counted until the job ends, not until its caller stops waiting: a cancelled request
        # leaves its job running on the model thread, and the queue is that much longer.
        future.add_done_callback(lambda _: _call_on_loop(loop, self._job_ended))
        result, waited = await asyncio.wrap_future(future)
        self._on_wait(waited)
        return result

    def _job_ended(self) -> None:
        self._pending -= 1
        self._on_depth(self._pending)


def _call_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop`` from any thread; nothing once the loop is closed (the
    worker is shutting down and nobody reads the count)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)
