"""A schedule-driven, open-loop HTTP load generator (wrk2's rule, in Python).

Every request has an *intended* send time fixed before the run starts (Poisson or constant-rate
arrivals). The sender dispatches each request at its time whatever the earlier ones are doing,
over a pool of keep-alive connections, and a request's latency is measured from its intended
send time, so a stall of the service (or of the generator) shows up as latency of every request
that should have gone out during it: coordinated omission is corrected, not hidden. Bodies are
serialised ahead of time, so the generator's work per request is a socket write and a header
parse.

The generator reports its own lag (actual minus intended send time) and CPU share, so that a
step where the generator, not the service, was the limit can be told apart. What the service
really received is checked separately, from its arrival log (:func:`read_arrivals`): the largest
number of arrivals in a short window, against what a Poisson stream of the same rate would give.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

BURST_WINDOW_S = 0.020
"""Window of the burst check: a few service times of one /rank."""

LEAD_TIME_S = 0.2
"""Delay between scheduling and the first intended send, so the first request is not late."""

WARM_GAP_S = 0.002
"""Pause between the warm-up connects (:meth:`OpenLoopClient.warm`)."""

KEEPALIVE_EXPIRY_S = 4.0
"""Idle connections older than this are closed rather than reused: servers drop idle keep-alive
connections (uvicorn after 5 s), and a request written into one the server is closing is lost
through no fault of the request. Clients such as httpx expire them the same way."""


# -- schedules ----------------------------------------------------------------------------


def poisson_schedule(rate: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Intended send offsets (s, sorted) of a Poisson process of ``rate``/s over ``seconds``."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    expected = rate * seconds
    # Draw a few standard deviations more gaps than expected, then cut at the horizon.
    gaps = rng.exponential(1.0 / rate, int(expected + 10 * math.sqrt(expected) + 10))
    times = np.cumsum(gaps)
    while times[-1] < seconds:  # astronomically rare; keep the schedule exact anyway
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, 64))])
    return times[times < seconds]


def constant_schedule(rate: float, seconds: float) -> np.ndarray:
    """Evenly spaced intended send offsets (s) at ``rate``/s over ``seconds``."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    return np.arange(int(rate * seconds)) / rate


def window_counts(times: np.ndarray, window: float, horizon: float) -> np.ndarray:
    """Arrivals in consecutive, non-overlapping windows of ``window`` s over [0, horizon)."""
    edges = np.arange(0.0, horizon + window, window)
    counts, _ = np.histogram(times, bins=edges)
    return counts


def dispersion_index(times: np.ndarray, window: float, horizon: float) -> float:
    """Variance over mean of the window counts: 1 for Poisson, 0 for constant, > 1 for bursts."""
    counts = window_counts(times, window, horizon)
    mean = counts.mean()
    return float(counts.var() / mean) if mean > 0 else math.nan


def max_in_window(times: np.ndarray, window: float = BURST_WINDOW_S) -> int:
    """The largest number of arrivals within any interval of length ``window`` (sliding)."""
    if times.size == 0:
        return 0
    ordered = np.sort(times)
    # For each arrival, the arrivals in [t, t + window): index of the first one past the end.
    ends = np.searchsorted(ordered, ordered + window, side="left")
    return int((ends - np.arange(ordered.size)).max())


def poisson_max_quantile(
    rate: float,
    seconds: float,
    window: float = BURST_WINDOW_S,
    quantile: float = 0.99,
    trials: int = 200,
    seed: int = 0,
) -> float:
    """The ``quantile`` of :func:`max_in_window` over Poisson streams of ``rate`` and length
    ``seconds`` (by simulation: the sliding-window maximum has no simple closed form)."""
    rng = np.random.default_rng(seed)
    maxima = [max_in_window(poisson_schedule(rate, seconds, rng), window) for _ in range(trials)]
    return float(np.quantile(maxima, quantile))


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedRequest:
    """One HTTP/1.1 request, serialised: ``wire`` is written to the socket as is."""

    route: str
    wire: bytes
    expected_items: int = -1
    """/rank: the items the answer must hold (-1: not checked)."""


def prepare_post(url: str, path: str, body: bytes, expected_items: int = -1) -> PreparedRequest:
    host = urlsplit(url).netloc
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return PreparedRequest(path, head + body, expected_items)


@dataclass(frozen=True)
class Outcome:
    route: str
    intended: float
    """loop.time() the request should have been sent at."""
    sent: float
    done: float
    status: int
    """HTTP status; 0 when the connection failed or the answer was malformed."""
    ok: bool

    @property
    def latency(self) -> float:
        """Seconds from the intended send to the last byte of the answer (wrk2's rule)."""
        return self.done - self.intended

    @property
    def lag(self) -> float:
        """Seconds the generator sent this request late."""
        return self.sent - self.intended


@dataclass(frozen=True)
class RunResult:
    outcomes: list[Outcome]
    wall_seconds: float
    cpu_seconds: float
    """CPU time of the generator's process over the run."""
    started_unix: float
    """time.time() of the first intended send (to line the run up with the service's log)."""
    connections: int
    """Connections opened over the run."""

    @property
    def cpu_share(self) -> float:
        """Generator CPU over wall time (1.0 = one core busy)."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else math.nan


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    async def exchange(self, wire: bytes) -> tuple[int, bytes, bool]:
        """(status, body, keep-alive) of one request on this connection."""
        self.writer.write(wire)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, keep_alive = 0, True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
        body = await self.reader.readexactly(length) if length else b""
        return status, body, keep_alive

    def close(self) -> None:
        self.writer.close()


class OpenLoopClient:
    """Sends prepared requests at their intended times over a keep-alive connection pool."""

    def __init__(
        self,
        url: str,
        max_connections: int = 256,
        timeout: float = 10.0,
        keepalive_expiry: float = KEEPALIVE_EXPIRY_S,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http://host:port URLs are supported, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.max_connections = max_connections
        self.timeout = timeout
        self.keepalive_expiry = keepalive_expiry
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._opened = 0
        self._returned: asyncio.Condition | None = None

    async def _connect(self) -> _Connection:
        self._open += 1
        self._opened += 1
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except BaseException:
            self._open -= 1
            raise
        return _Connection(reader, writer)

    async def _acquire(self) -> _Connection:
        assert self._returned is not None
        while True:
            while self._idle:
                # Least recently used first: every connection carries its share of the load,
                # so a server's workers see the requests of every connection they accepted
                # (most recently used first piles the load onto a few connections, and so onto
                # whichever worker happened to accept them).
                connection = self._idle.popleft()
                if time.monotonic() - connection.idle_since < self.keepalive_expiry:
                    return connection
                connection.close()
                self._open -= 1
            if self._open < self.max_connections:
                return await self._connect()
            async with self._returned:
                await self._returned.wait()

    async def _release(self, connection: _Connection | None) -> None:
        assert self._returned is not None
        if connection is None:
            self._open -= 1
        else:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        async with self._returned:
            self._returned.notify()

    async def _one(self, request: PreparedRequest, intended: float, sent: float) -> Outcome:
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        status, ok = 0, False
        try:
            connection = await asyncio.wait_for(self._acquire(), self.timeout)
            status, body, keep_alive = await asyncio.wait_for(
                connection.exchange(request.wire), self.timeout
            )
            ok = status in (200, 202)
            if ok and request.expected_items >= 0:
                ok = body.count(b'"item_id"') == request.expected_items
            if not keep_alive:
                connection.close()
                connection = None
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
            if connection is not None:
                connection.close()
                connection = None
        done = loop.time()
        await self._release(connection)
        return Outcome(request.route, intended, sent, done, status, ok)

    async def warm(self, connections: int) -> None:
        """Open ``connections`` keep-alive connections before the clock starts, one at a time
        as independent clients would: a server whose workers share one listening socket lets
        the first worker to wake accept every connection already waiting, so a simultaneous
        burst of connects would all land on one worker."""
        self._returned = self._returned or asyncio.Condition()
        for _ in range(connections):
            self._idle.append(await self._connect())
            await asyncio.sleep(WARM_GAP_S)

    async def run(self, schedule: np.ndarray, requests: Sequence[PreparedRequest]) -> RunResult:
        """Send ``requests[i]`` at ``schedule[i]`` s after the start; wait for every answer."""
        if len(requests) != len(schedule):
            raise ValueError(f"{len(requests)} requests for {len(schedule)} send times")
        self._returned = self._returned or asyncio.Condition()
        loop = asyncio.get_running_loop()
        opened_before = self._opened
        cpu_started = time.process_time()
        start = loop.time() + LEAD_TIME_S
        started_unix = time.time() + LEAD_TIME_S
        tasks: list[asyncio.Task[Outcome]] = []
        for offset, request in zip(schedule.tolist(), requests, strict=True):
            intended = start + offset
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(self._one(request, intended, loop.time())))
        outcomes = list(await asyncio.gather(*tasks))
        wall = loop.time() - start
        return RunResult(
            outcomes=outcomes,
            wall_seconds=wall,
            cpu_seconds=time.process_time() - cpu_started,
            started_unix=started_unix,
            connections=self._opened - opened_before,
        )

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        self._open = 0


def run_open_loop(
    url: str,
    schedule: np.ndarray,
    requests: Sequence[PreparedRequest],
    warm_connections: int = 32,
    max_connections: int = 256,
    timeout: float = 10.0,
    keepalive_expiry: float = KEEPALIVE_EXPIRY_S,
) -> RunResult:
    """Run one schedule in a fresh event loop (uvloop where installed) and return the outcomes."""

    async def main() -> RunResult:
        client = OpenLoopClient(url, max_connections, timeout, keepalive_expiry)
        try:
            await client.warm(warm_connections)
            return await client.run(schedule, requests)
        finally:
            client.close()

    # What the caller built before the run (the world, the bodies: hundreds of thousands of
    # objects) is frozen for its length: a full collection walking them held the GIL for
    # 100+ ms, a stall that sends the requests due meanwhile late and in a burst.
    gc.collect()
    gc.freeze()
    try:
        try:
            import uvloop

            return uvloop.run(main())
        except ImportError:
            return asyncio.run(main())
    finally:
        gc.unfreeze()


# -- the service's side: its arrival log ---------------------------------------------------------


def read_arrivals(directory: Path, start_unix: float, end_unix: float) -> np.ndarray:
    """Arrival times (unix s, sorted) the service's workers logged within [start, end).

    Each worker appends float64 unix times to ``arrivals-<pid>.bin`` in ``directory`` (the
    service's ``arrival_log`` setting, :mod:`service.arrivals`).
    """
    parts = [np.fromfile(path, dtype="<f8") for path in sorted(directory.glob("arrivals-*.bin"))]
    if not parts:
        return np.empty(0)
    times = np.sort(np.concatenate(parts))
    return times[(times >= start_unix) & (times < end_unix)]


@dataclass(frozen=True)
class ArrivalCheck:
    """What the service saw against what was offered, over one step."""

    arrivals: int
    intended_max: int | None
    """Most intended sends within any window of :data:`BURST_WINDOW_S` (the offered schedule;
    None where the generator keeps no schedule, as Locust does not)."""
    observed_max: int
    """Most arrivals the service logged within any such window."""
    poisson_q999: float
    """99.9 % quantile of that maximum for a Poisson stream of the offered rate and length."""

    @property
    def bursty(self) -> bool:
        """More bunched than a Poisson stream of the offered rate plausibly is."""
        return self.observed_max > self.poisson_q999


def check_arrivals(
    observed: np.ndarray, intended: np.ndarray | None, rate: float, seconds: float
) -> ArrivalCheck:
    return ArrivalCheck(
        arrivals=int(observed.size),
        intended_max=max_in_window(intended) if intended is not None else None,
        observed_max=max_in_window(observed),
        poisson_q999=poisson_max_quantile(rate, seconds, quantile=0.999, trials=1000),
    )
