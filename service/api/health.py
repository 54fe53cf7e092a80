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

READY_PING_SECONDS = 1.0


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Readiness: the model is loaded and the store answers",
    responses={503: {"model": ErrorResponse, "description": "Not ready; detail says why."}},
)
async def readyz(request: Request) -> Response:
    services = getattr(request.app.state, "services", None)
    if not isinstance(services, Services):
        return json_response({"detail": "model not loaded"}, status_code=503)
    try:
        await asyncio.wait_for(services.store.ping(), timeout=READY_PING_SECONDS)
    except (StoreError, TimeoutError) as error:
        reason = str(error) or f"no answer within {READY_PING_SECONDS} s"
        return json_response({"detail": f"store unreachable: {reason}"}, status_code=503)
    return json_response({"status": "ready", "model_version": services.runtime.version})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Text exposition."}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(exposition(metrics.registry), media_type=CONTENT_TYPE_LATEST)
