"""An arrival log for load tests: each worker appends the unix time of every request it receives.

Load generators can claim a schedule they did not keep (a stalled generator releases a burst).
With ``arrival_log`` set, every worker process appends one little-endian float64 per request to
``<dir>/arrivals-<pid>.bin`` as the request enters the app, so a capacity run can check what the
service really received (:func:`loadtest.openloop.read_arrivals`). One unbuffered 8-byte write
per request; off by default.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.metrics import METRICS_ROUTE

_PACK = struct.Struct("<d").pack


class ArrivalLogMiddleware:
    def __init__(self, app: ASGIApp, directory: Path) -> None:
        self.app = app
        self.directory = directory
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        # Opened lazily, per process: uvicorn's workers import the app after forking/spawning.
        if self._fd is None or self._pid != os.getpid():
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"arrivals-{os.getpid()}.bin"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._fd

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != METRICS_ROUTE:
            os.write(self._file(), _PACK(time.time()))
        await self.app(scope, receive, send)
