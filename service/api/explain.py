"""POST /explain: which of the user's history events drove one item's score (debugging)."""

from __future__ import annotations

import math

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from starlette.responses import Response

from service.api.deps import ServicesDep
from service.errors import json_response
from service.explain import ExplainUnavailable, explain, render
from service.schemas import STORE_RESPONSES, VALIDATION_RESPONSES, ErrorResponse, Id, Timestamp

router = APIRouter(tags=["debugging"])

MAX_TOP = 1000


class ExplainRequest(BaseModel):
    model_config = {"extra": "forbid"}

    user_id: Id = Field(description="The user whose history is explained.")
    item_id: Id = Field(description="The item whose score is explained.")
    top: int = Field(
        default=20, strict=True, ge=1, le=MAX_TOP, description="Events listed per head."
    )
    request_time: Timestamp | None = Field(
        default=None,
        description="Unix seconds the score is computed at, as in /rank (decay). Omitted: now.",
    )


class ExplainedEvent(BaseModel):
    position: int = Field(description="The event's position in the user's log.")
    event_id: str | None = Field(
        description="Its event_id; null once it is older than the dedup window (not kept)."
    )
    item_id: int = Field(description="The item of the event.")
    action: str = Field(description="The event's action (GET /model lists the vocabulary).")
    timestamp: float = Field(description="The event's unix time in seconds.")
    weight: float = Field(
        description="Its share of the head's attention (decay included): the weights of a "
        "head's whole window sum to 1 (up to the read's epsilon)."
    )


class HeadExplanation(BaseModel):
    head: int = Field(description="Attention head, 0-based.")
    mass: float = Field(
        description="The head's attention mass φ(q)ᵀz over the whole window (the degree)."
    )
    listed_share: float = Field(description="Share of the weights the listed events carry.")
    events: list[ExplainedEvent] = Field(description="The top events, largest weight first.")


class CombinedExplanation(BaseModel):
    mass: float = Field(description="The heads' masses summed.")
    listed_share: float = Field(description="Share of the weights the listed events carry.")
    events: list[ExplainedEvent] = Field(
        description="The top events by the mean of the heads' weights."
    )


class ExplainResponse(BaseModel):
    model_version: str = Field(description="The version that computed the score and weights.")
    user_id: int = Field(description="The user explained.")
    item_id: int = Field(description="The item explained.")
    request_time: float = Field(description="Unix seconds the score and weights are at.")
    score: float = Field(description="The item's score, as /rank would give it now.")
    probabilities: dict[str, float] = Field(description="Per objective, as /rank gives them.")
    history_length: int = Field(description="Events in the window the weights cover.")
    heads: list[HeadExplanation] = Field(description="One explanation per attention head.")
    combined: CombinedExplanation = Field(description="All heads together.")


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Explain one item's score by the user's history events (a debugging call)",
    description="Weighs every event of the user's window for the item, as the model's linear "
    "attention does (exact, not sampled): per head and combined, the top events by weight, the "
    "attention mass and the share the listed events carry. It reads the user's whole window "
    "(O(N)), so it is rate-limited per worker (explain_rate_per_second): not for the hot path.",
    responses={
        **VALIDATION_RESPONSES,
        **STORE_RESPONSES,
        429: {"model": ErrorResponse, "description": "Rate limit: retry after Retry-After."},
    },
)
async def post_explain(body: ExplainRequest, services: ServicesDep) -> Response:
    wait = services.explain_limit.take()
    if wait > 0:
        services.metrics.explains.labels(outcome="rate_limited").inc()
        retry = "3600" if math.isinf(wait) else str(max(1, math.ceil(wait)))
        raise HTTPException(
            429,
            "explain_rate_per_second reached (0 turns /explain off); retry later",
            headers={"Retry-After": retry},
        )
    serving = services.model.current  # one version for the whole explanation
    try:
        explanation = await explain(
            serving.ranker, services.explain_nets, body.user_id, body.item_id, body.request_time
        )
    except ExplainUnavailable as error:
        return json_response({"detail": str(error)}, status_code=409)
    services.metrics.explains.labels(outcome="ok").inc()
    return json_response(render(explanation, body.top, serving.runtime.stored_actions.stored_names))
