"""Counts that must not drift: live gauges of a worker that was killed, the model queue's depth
while a cancelled caller's job still runs, the in-flight count of a request whose body is still
arriving, and the server's own connection limit (a 503, never a dropped connection)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from starlette.types import Message, Receive, Scope, Send

from loadtest.harness import REPO_ROOT, running_service, wait_until
from service.admission import AdmissionMiddleware
from service.errors import Overloaded
from service.metrics import MULTIPROCESS_ENV, Metrics, retire_dead_workers
from service.model_queue import ModelQueue

# -- live gauges of a killed worker ---------------------------------------------------------

_WORKER = """
import sys, time
from prometheus_client import Gauge
Gauge("ifa_test_inflight", "in flight", multiprocess_mode="livesum").set(float(sys.argv[1]))
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def gauge_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[str]]]:
    """Two processes that each set a live gauge in one multiprocess directory: 5 and 7."""
    env = os.environ | {MULTIPROCESS_ENV: str(tmp_path)}
    started = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, value],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for value in ("5", "7")
    ]
    try:
        for process in started:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield started[0], started[1]
    finally:
        for process in started:
            process.kill()
            process.wait()


def live_sum(directory: Path) -> str:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry).decode()


def test_the_live_gauges_of_a_killed_worker_are_retired(
    gauge_workers: tuple[subprocess.Popen[str], subprocess.Popen[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    killed, _still_running = gauge_workers
    assert "ifa_test_inflight 12.0" in live_sum(tmp_path)
    killed.send_signal(signal.SIGKILL)  # no shutdown: its files stay behind
    killed.wait()
    assert "ifa_test_inflight 12.0" in live_sum(tmp_path)
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    assert retire_dead_workers() == [killed.pid]
    assert "ifa_test_inflight 7.0" in live_sum(tmp_path)  # the live worker's value stays
    assert retire_dead_workers() == []


# -- the model queue counts a job until it ends ---------------------------------------------


@pytest.mark.anyio
async def test_a_cancelled_callers_job_is_counted_until_it_ends() -> None:
    depths: list[int] = []
    started, release = threading.Event(), threading.Event()

    def held() -> None:
        started.set()
        release.wait()

    with ThreadPoolExecutor(1) as executor:
        queue = ModelQueue(executor, limit=1, inline=False, on_depth=depths.append)
        try:
            caller = asyncio.ensure_future(queue.run(held))
            await asyncio.get_running_loop().run_in_executor(None, started.wait)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            # The caller is gone, its job still holds the model thread: the queue is full.
            assert queue.pending == 1
            with pytest.raises(Overloaded, match="model queue full"):
                await queue.run(lambda: None)
        finally:
            release.set()
        while queue.pending:
            await asyncio.sleep(0.01)
        assert await queue.run(lambda: 3) == 3
    assert depths[-1] == 0


# -- admission counts a request before reading its body --------------------------------------


@pytest.mark.anyio
async def test_a_request_counts_against_the_limit_while_its_body_arrives() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})

    admission = AdmissionMiddleware(
        app, Metrics(), max_inflight=1, max_body_bytes=1 << 20, retry_after_seconds=1
    )
    rest_of_body = asyncio.Event()
    chunks: list[Message] = [
        {"type": "http.request", "body": b"first ", "more_body": True},
        {"type": "http.request", "body": b"last", "more_body": False},
    ]

    async def slow_upload() -> Message:
        message = chunks.pop(0)
        if not message["more_body"]:
            await rest_of_body.wait()  # the client is slow to send the rest
        return message

    async def whole_body() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    def scope() -> Scope:
        return {"type": "http", "method": "POST", "path": "/events", "headers": []}

    sent: dict[str, list[Message]] = {"slow": [], "next": []}

    async def record(name: str, message: Message) -> None:
        sent[name].append(message)

    slow = asyncio.ensure_future(admission(scope(), slow_upload, lambda m: record("slow", m)))
    while len(chunks) == 2:  # until the first chunk is read: the body is arriving
        await asyncio.sleep(0)
    await admission(scope(), whole_body, lambda m: record("next", m))
    rest_of_body.set()
    await slow
    assert sent["next"][0]["status"] == 503
    assert sent["slow"][0]["status"] == 200 and sent["slow"][1]["body"] == b"first last"
    assert admission.inflight == 0


# -- the server's own limit ------------------------------------------------------------------


@pytest.mark.e2e
def test_past_the_servers_connection_limit_a_request_gets_a_503(
    artifact_dir: Path, tmp_path: Path
) -> None:
    env = {"IFA_LIMIT_CONCURRENCY": "2", "IFA_MAX_INFLIGHT": "1", "IFA_LOG_LEVEL": "warning"}
    with running_service(artifact_dir, tmp_path / "service.log", env=env, timeout=120) as live:
        port = int(live.url.rsplit(":", 1)[1])
        idle = socket.create_connection(("127.0.0.1", port))
        answers: list[httpx.Response] = []

        def refused() -> bool:
            answers.append(httpx.get(f"{live.url}/healthz", timeout=10))
            return answers[-1].status_code != 200

        try:
            # With the idle connection accepted, a new one meets the limit of 2.
            wait_until(refused, 30, "a request past the connection limit")
        finally:
            idle.close()
        wait_until(lambda: httpx.get(f"{live.url}/healthz").status_code == 200, 30, "healthz")
    assert answers[-1].status_code == 503
    assert answers[-1].text == "Service Unavailable"
