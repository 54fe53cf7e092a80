"""POST /rank: score a candidate set for a user, best first."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import ServicesDep
from service.api.fast_body import FastBodyRoute
from service.errors import Overloaded, validation_error
from service.middleware import START_TIME_KEY, remaining_budget
from service.schemas import (
    STORE_RESPONSES,
    VALIDATION_RESPONSES,
    ErrorResponse,
    RankRequest,
    RankResponse,
)

router = APIRouter(tags=["ranking"], route_class=FastBodyRoute)


@router.post(
    "/rank",
    response_model=RankResponse,
    summary="Rank a candidate set for a user",
    description="Scores the whole candidate set in one pass against the user's cached behaviour "
    "state (events posted to /events are folded in first) and returns the best k. When the "
    "state store does not answer in time the request is still answered, from a recent or empty "
    "state, with state_cache 'degraded'.",
    responses={
        **VALIDATION_RESPONSES,
        **STORE_RESPONSES,
        500: {"model": ErrorResponse, "description": "The model failed."},
    },
)
async def rank(body: RankRequest, request: Request, services: ServicesDep) -> Response:
    limit, count = services.settings.max_candidates, len(body.candidate_ids)
    if count > limit:
        raise validation_error(
            ("body", "candidate_ids"),
            f"List should have at most {limit} items (max_candidates), not {count}",
            "too_long",
        )
    services.activity.touch((body.user_id,))
    received_at = request.scope.get(START_TIME_KEY)
    budget = remaining_budget(services.settings.request_budget_seconds, received_at)
    try:
        async with asyncio.timeout(budget):
            content = await services.ranker.rank(
                body.user_id,
                body.candidate_ids,
                body.k if body.k is not None else services.settings.default_k,
                request_time=body.request_time,
                received_at=received_at,
            )
    except TimeoutError:
        raise Overloaded("the request budget was spent before the ranking was done") from None
    return Response(content, media_type="application/json")
