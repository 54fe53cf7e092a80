"""The schedule-driven generator: its schedules, its burst arithmetic, and its latency rule
(from the intended send) against a real, deliberately stalling HTTP server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from loadtest.openloop import (
    check_arrivals,
    constant_schedule,
    dispersion_index,
    max_in_window,
    poisson_max_quantile,
    poisson_schedule,
    prepare_post,
    run_open_loop,
    window_counts,
)

# -- schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [50.0, 250.0])
def test_poisson_schedule_is_poisson(rate: float) -> None:
    """Counts in fixed windows have variance ≈ mean (dispersion 1), and the gaps are
    exponential: a constant or bunched schedule fails either check."""
    seconds = 200.0
    times = poisson_schedule(rate, seconds, np.random.default_rng(1))
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < seconds
    assert abs(times.size - rate * seconds) < 4 * np.sqrt(rate * seconds)
    # For Poisson counts the dispersion index over k windows has std ≈ sqrt(2 / k).
    windows = int(seconds / 0.1)
    assert abs(dispersion_index(times, 0.1, seconds) - 1.0) < 5 * np.sqrt(2 / windows)
    gaps = np.diff(times)
    # Exponential gaps: coefficient of variation 1, and P(gap > mean) = 1/e.
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05
    assert abs((gaps > gaps.mean()).mean() - np.exp(-1)) < 0.02


def test_constant_and_bunched_schedules_are_told_apart() -> None:
    seconds = 100.0
    # Float bin edges move the odd arrival to a neighbouring window: near 0, far below 1.
    assert dispersion_index(constant_schedule(100.0, seconds), 0.1, seconds) < 0.2
    # The same mean rate released in bursts of 20 every 200 ms: heavily over-dispersed.
    bursts = np.repeat(np.arange(0.0, seconds, 0.2), 20) + 1e-4 * np.tile(np.arange(20), 500)
    assert dispersion_index(bursts, 0.02, seconds) > 5
    assert max_in_window(bursts) == 20
    assert max_in_window(bursts) > poisson_max_quantile(100.0, seconds, quantile=0.999)


def test_max_in_window_counts_a_sliding_window() -> None:
    times = np.array([0.0, 0.005, 0.019, 0.020, 0.1, 0.1001, 0.1002])
    # [0, 0.02) holds three; the window from 0.1 holds three; 0.005..0.025 holds three.
    assert max_in_window(times, 0.02) == 3
    assert max_in_window(np.array([0.0, 0.0199, 0.0398]), 0.02) == 2
    assert max_in_window(np.empty(0)) == 0
    assert window_counts(times, 0.05, 0.15).tolist() == [4, 0, 3]


def test_arrival_check_flags_bursts_only() -> None:
    rng = np.random.default_rng(3)
    offered = poisson_schedule(100.0, 20.0, rng)
    calm = check_arrivals(offered + 1e-3, offered, 100.0, 20.0)
    assert not calm.bursty and calm.observed_max == calm.intended_max
    burst = np.sort(np.concatenate([offered, np.full(15, 10.0) + np.arange(15) * 1e-4]))
    assert check_arrivals(burst, offered, 100.0, 20.0).bursty


# -- the latency rule, against a real server ------------------------------------------------------


STALL_SECONDS = 0.3
SERVER_IDLE_SECONDS = 0.3
"""The test server closes a keep-alive connection idle this long, as uvicorn does after 5 s."""


@pytest.fixture
def stalling_server() -> Iterator[str]:
    """An HTTP/1.1 keep-alive server that handles one request at a time (a single model
    thread) and stalls for STALL_SECONDS on the request whose body is b"stall"."""
    loop = asyncio.new_event_loop()
    lock = asyncio.Lock()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(
                        reader.readuntil(b"\r\n\r\n"), SERVER_IDLE_SECONDS
                    )
                except TimeoutError:
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                async with lock:
                    if body == b"stall":
                        await asyncio.sleep(STALL_SECONDS)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"

    async def shut_down() -> None:
        server.close()
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()

    asyncio.run_coroutine_threadsafe(shut_down(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_latency_is_measured_from_the_intended_send(stalling_server: str) -> None:
    """Requests due while the server stalls wait for it, and that wait is their latency: a
    generator that timed from the actual send after a stall (coordinated omission) would report
    them fast. Every request is sent on schedule, not held back by the stall."""
    schedule = np.arange(40) * 0.01  # 100/s for 0.4 s; the stall starts at 0.05 s
    requests = [
        prepare_post(stalling_server, "/x", b"stall" if i == 5 else b"go") for i in range(40)
    ]
    result = run_open_loop(stalling_server, schedule, requests, warm_connections=4)
    assert all(o.ok for o in result.outcomes)
    lags = np.array([o.lag for o in result.outcomes])
    assert lags.max() < 0.05, "the generator must keep its schedule during the stall"
    stall_end = result.outcomes[5].done
    for outcome in result.outcomes[6:]:
        due_in_stall = outcome.intended < stall_end
        if due_in_stall:
            # Served only after the stall, and charged from the intended send.
            assert outcome.done >= stall_end
            assert outcome.latency >= stall_end - outcome.intended - 1e-3
    waited = [o.latency for o in result.outcomes[6:] if o.intended < stall_end - 0.1]
    assert waited and min(waited) > 0.1


def test_idle_connections_are_expired_before_the_server_drops_them(stalling_server: str) -> None:
    """Requests spaced wider than the server's idle timeout: reusing a connection the server
    has closed would lose the request; expired connections are replaced, so none fails."""
    schedule = np.array([0.0, 0.5, 1.0, 1.5])
    requests = [prepare_post(stalling_server, "/x", b"go") for _ in schedule]
    result = run_open_loop(
        stalling_server, schedule, requests, warm_connections=2, keepalive_expiry=0.2
    )
    assert all(o.ok for o in result.outcomes)
    assert result.connections >= 2  # the warm ones expired and new ones were opened
    stale = run_open_loop(
        stalling_server, schedule, requests, warm_connections=2, keepalive_expiry=60.0
    )
    assert not all(o.ok for o in stale.outcomes), "the server really drops idle connections"
