"""Admission control, before a request reaches the app: a per-worker in-flight limit and a body
size limit, both answered at once (503 + Retry-After, 413) without reading or parsing more. A
request counts against the in-flight limit from before its body is read.

Pure ASGI, like :mod:`service.middleware`. The in-flight limit answers before any queue grows:
a worker that already handles ``max_inflight`` requests refuses the next, and the client (or the
load balancer) retries elsewhere. The body limit reads at most ``max_body_bytes`` (a declared
Content-Length beyond it is refused without reading anything); the body read is then handed to
the app, which parses it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

LIMITED_ROUTES = frozenset({"/rank", "/events", "/items"})
"""Routes that do work: health, metrics and info never count against the limit, so probes and
scrapes still answer on a saturated worker."""

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class RouteLabel:
    """Stands in for the matched route in the scope of a request refused before routing, so
    that :class:`service.middleware.HttpMetricsMiddleware` labels it with its route."""

    path: str


class AdmissionMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_inflight: int,
        max_body_bytes: int,
        retry_after_seconds: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(retry_after_seconds).encode()
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path not in LIMITED_ROUTES:
            await self._admit_body(scope, receive, send, limited=False)
            return
        if self.inflight >= self.max_inflight:
            scope["route"] = RouteLabel(path)
            self.metrics.errors.labels(kind="overloaded").inc()
            detail = f"this worker is handling {self.inflight} requests; retry shortly"
            await _answer(send, 503, detail, [(b"retry-after", self.retry_after)])
            return
        # Counted from here, its body read included: a slow client's upload holds the worker
        # too, and uncounted ones would let any number of them past the limit at once.
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            await self._admit_body(scope, receive, send, limited=True)
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()

    async def _admit_body(self, scope: Scope, receive: Receive, send: Send, limited: bool) -> None:
        """Read the body (of a method that has one) within the size limit and hand the
        request to the app, or answer 413."""
        if scope.get("method") in BODY_METHODS:
            body = await self._read_body(scope, receive)
            if body is None:
                if limited:
                    scope["route"] = RouteLabel(scope.get("path", ""))
                self.metrics.errors.labels(kind="too_large").inc()
                detail = f"body: larger than the limit of {self.max_body_bytes} bytes"
                await _answer(send, 413, detail, [(b"connection", b"close")])
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it is known to exceed the limit."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return None
                except ValueError:
                    pass  # the server rejects a malformed Content-Length itself
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees an empty body and nobody reads it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the body already read, then defers to the server's."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
