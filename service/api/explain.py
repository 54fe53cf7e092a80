"""POST /explain: which of the user's history events drove one item's score (debugging)."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field, field_validator
from starlette.responses import Response

from service.api.deps import ServicesDep, TokenDep
from service.errors import Conflict, json_response, validation_error
from service.explain import ExplainUnavailable, explain, render
from service.schemas import (
    STORE_RESPONSES,
    VALIDATION_RESPONSES,
    ErrorResponse,
    Id,
    IntegralNumber,
    Timestamp,
    ValidationErrorResponse,
    unique_candidates,
)

router = APIRouter(tags=["debugging"])

MAX_TOP = 1000


class ExplainRequest(BaseModel):
    model_config = {"extra": "forbid"}

    user_id: Id = Field(description="The user whose history is explained.")
    item_id: Id = Field(description="The item whose score is explained.")
    top: Annotated[int, IntegralNumber] = Field(
        default=20, strict=True, ge=1, le=MAX_TOP, description="Events listed per head."
    )
    request_time: Timestamp | None = Field(
        default=None,
        description="Unix seconds the score is computed at, as in /rank (decay). Omitted: now.",
    )
    candidate_ids: list[Id] | None = Field(
        default=None,
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="The candidate set of the /rank whose score is explained (it must hold "
        "item_id; unique ids, at most max_candidates): the score and probabilities are then "
        "exactly that /rank's for the item (with the same request_time and history), since the "
        "model's set-aware module (RAM) makes an item's score depend on the other candidates. "
        "Omitted: the item is scored in a set of its own, which a /rank of a larger set does "
        "not reproduce.",
    )

    @field_validator("candidate_ids")
    @classmethod
    def _unique(cls, ids: list[int] | None) -> list[int] | None:
        return unique_candidates(ids) if ids is not None else None


class ExplainedEvent(BaseModel):
    position: int = Field(description="The event's position in the user's log.")
    event_id: None = Field(
        default=None,
        description="Always null, kept for clients that read it: the store keeps a digest of "
        "each event_id, not the id (event_digest).",
    )
    event_digest: str | None = Field(
        description="BLAKE2b-64 of its event_id, 16 hex digits (the store keeps digests, not "
        "ids); null once the event is older than the dedup window (not remembered)."
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
    score: float = Field(
        description="The item's score as a /rank of the request's candidate_ids gives it now "
        "(omitted: of the item alone)."
    )
    probabilities: dict[str, float] = Field(description="Per objective, as that /rank gives them.")
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
    "(O(N)), so it is rate-limited per worker and client (explain_rate_per_second): not for the "
    "hot path. It returns a user's history: it needs the api_token where one is configured.",
    responses={
        **VALIDATION_RESPONSES,
        **STORE_RESPONSES,
        409: {
            "model": ValidationErrorResponse,
            "description": "candidate_ids is given without item_id among them.",
        },
        429: {"model": ErrorResponse, "description": "Rate limit: retry after Retry-After."},
    },
)
async def post_explain(
    body: ExplainRequest, request: Request, services: ServicesDep, token: TokenDep
) -> Response:
    wait = services.explain_limits.take(client_key(request, token))
    if wait > 0:
        services.metrics.explains.labels(outcome="rate_limited").inc()
        retry = "3600" if math.isinf(wait) else str(max(1, math.ceil(wait)))
        raise HTTPException(
            429,
            "explain_rate_per_second reached for this client (0 turns /explain off); retry later",
            headers={"Retry-After": retry},
        )
    limit = services.settings.max_candidates
    if body.candidate_ids is not None and len(body.candidate_ids) > limit:
        raise validation_error(
            ("body", "candidate_ids"),
            f"List should have at most {limit} items (max_candidates), "
            f"not {len(body.candidate_ids)}",
            "too_long",
        )
    if body.candidate_ids is not None and body.item_id not in body.candidate_ids:
        # Schema-valid (a schema cannot tie one field's value to another's items): a 409.
        raise Conflict(
            [(("body", "candidate_ids"),
              f"candidate_ids must hold item_id {body.item_id} (the item whose score is explained)",
              "value_error")]
        )  # fmt: skip
    serving = services.model.current  # one version for the whole explanation
    try:
        explanation = await explain(
            serving.ranker,
            services.explain_nets,
            body.user_id,
            body.item_id,
            body.request_time,
            body.candidate_ids,
        )
    except ExplainUnavailable as error:
        return json_response({"detail": str(error)}, status_code=409)
    services.metrics.explains.labels(outcome="ok").inc()
    return json_response(render(explanation, body.top, serving.runtime.stored_actions.stored_names))


def client_key(request: Request, token: int | None) -> str:
    """Whose rate bucket a call spends: the accepted token's and the caller's address, so that
    one client (even an operator's script, with the shared token) cannot lock out the others."""
    address = request.client.host if request.client is not None else "unknown"
    return f"{token if token is not None else '-'}@{address}"
