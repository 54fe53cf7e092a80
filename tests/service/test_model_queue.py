"""Where torch work runs: inline on the loop, or on the model thread behind a bounded queue."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.errors import Overloaded
from service.model_queue import ModelQueue


@pytest.mark.anyio
async def test_inline_runs_short_jobs_on_the_loop_and_long_ones_on_the_thread() -> None:
    loop_thread = threading.get_ident()
    with ThreadPoolExecutor(1) as executor:
        queue = ModelQueue(executor, limit=4, inline=True)
        assert await queue.run(threading.get_ident) == loop_thread
        assert await queue.run(threading.get_ident, long=True) != loop_thread
        threaded = ModelQueue(executor, limit=4, inline=False)
        assert await threaded.run(threading.get_ident) != loop_thread


@pytest.mark.anyio
async def test_the_thread_queue_is_bounded_and_its_wait_measured() -> None:
    waits: list[float] = []
    depths: list[int] = []
    release = threading.Event()
    with ThreadPoolExecutor(1) as executor:
        queue = ModelQueue(executor, limit=2, inline=False, on_wait=waits.append,
                           on_depth=depths.append)  # fmt: skip
        first = asyncio.ensure_future(queue.run(release.wait))
        second = asyncio.ensure_future(queue.run(lambda: 7))
        await asyncio.sleep(0.05)
        assert queue.pending == 2
        with pytest.raises(Overloaded, match="model queue full"):
            await queue.run(lambda: 0)
        release.set()
        assert await first is True and await second == 7
    assert queue.pending == 0 and depths[-1] == 0 and max(depths) == 2
    # The second job waited behind the first for at least the 50 ms it was held.
    assert len(waits) == 2 and max(waits) >= 0.04
