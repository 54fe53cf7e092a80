"""Event-loop lag: how late a timer fires on a worker's loop.

Everything a worker does besides torch runs on its event loop (parsing, featurisation, store
round trips, serialisation), so a loop that is late by milliseconds delays every request in the
process. A timer every :data:`PROBE_SECONDS` measures the lateness; the gauge holds the largest
over the last :data:`WINDOW_PROBES` probes, so a scrape every few seconds still sees a spike.
"""

from __future__ import annotations

import asyncio
from collections import deque

from prometheus_client import Gauge

PROBE_SECONDS = 0.1
WINDOW_PROBES = 50


async def watch_loop_lag(gauge: Gauge) -> None:
    """Run until cancelled, keeping ``gauge`` at the recent maximum lag (seconds)."""
    loop = asyncio.get_running_loop()
    recent: deque[float] = deque(maxlen=WINDOW_PROBES)
    while True:
        expected = loop.time() + PROBE_SECONDS
        await asyncio.sleep(PROBE_SECONDS)
        recent.append(max(0.0, loop.time() - expected))
        gauge.set(max(recent))
