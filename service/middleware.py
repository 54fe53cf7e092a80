"""Pure ASGI middleware that counts and times HTTP requests by route template.

Pure ASGI (not BaseHTTPMiddleware) so that it adds no task or body copy to each request. The route
label is the template the router matched ("/rank"), read from the scope after the app ran, or
"other" when nothing matched, so that scanners cannot blow up the label set.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

START_TIME_KEY = "ifa.start_time"
"""Scope key holding the perf_counter time the request entered the app (stage timings use it)."""

UNMATCHED_ROUTE = "other"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope[START_TIME_KEY] = started
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "GET")
            method = method if method in KNOWN_METHODS else "other"
            self.metrics.observe_request(template, method, status, time.perf_counter() - started)


def remaining_budget(budget_seconds: float, received_at: float | None) -> float:
    """What is left of a request's budget, counted from when it entered the app."""
    if received_at is None:
        return budget_seconds
    return max(budget_seconds - (time.perf_counter() - received_at), 0.0)
