"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from service.api.deps import MetricsDep, Services
from service.errors import json_response
from service.metrics import exposition
from service.schemas import ErrorResponse, HealthResponse, ReadyResponse
from service.stores.base import StoreError

router = APIRouter(tags=["operations"])

READY_PING_SECONDS = 0.2
"""Bound of the informational store ping: well under a kubelet probe's 1 s timeout."""


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Readiness: the model is loaded (a store outage is degraded mode, not unreadiness)",
    responses={503: {"model": ErrorResponse, "description": "Not ready; detail says why."}},
)
async def readyz(request: Request) -> Response:
    services = getattr(request.app.state, "services", None)
    if not isinstance(services, Services):
        return json_response({"detail": "model not loaded"}, status_code=503)
    # DESIGN §5: every replica shares the store, so failing readiness on a store outage would
    # take them all out of the Service at once; /rank answers degraded instead, and /events 503s.
    store = "ok"
    try:
        await asyncio.wait_for(services.store.ping(), timeout=READY_PING_SECONDS)
    except (StoreError, TimeoutError):
        store = "unavailable"
    return json_response(
        {"status": "ready", "model_version": services.runtime.version, "store": store}
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Text exposition."}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(exposition(metrics.registry), media_type=CONTENT_TYPE_LATEST)
