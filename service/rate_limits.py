"""Rate limits per client: one token bucket for each caller, so that one caller spending its
budget (a script in a loop) leaves every other caller theirs, instead of a single bucket per
worker that the first busy client empties for everyone."""

from __future__ import annotations

from collections import OrderedDict

from service.explain import RateLimit

MAX_CLIENTS = 1024
"""Buckets kept per worker. Past it the least recently seen client's is dropped: memory stays
bounded whatever the number of callers, and a dropped bucket only starts full again."""


class ClientRateLimits:
    """``rate`` calls per second and ``burst`` at once, per client key (per worker)."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, RateLimit] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """0 when ``client`` may call now (a token of its bucket is spent), else seconds until
        it may (infinite when the rate is 0: the route is off)."""
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = RateLimit(self.rate, self.burst)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return bucket.take()
