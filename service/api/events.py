"""POST /events: append behaviour events, idempotently by event id."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from service.api.deps import ServicesDep, TokenDep
from service.errors import validation_error, validation_errors
from service.middleware import START_TIME_KEY, remaining_budget
from service.schemas import (
    AUTH_RESPONSES,
    STORE_RESPONSES,
    VALIDATION_RESPONSES,
    EventsRequest,
    EventsResponse,
)
from service.stores.base import NewEvent, StoreError

router = APIRouter(tags=["events"])


@router.post(
    "/events",
    response_model=EventsResponse,
    summary="Record behaviour events",
    description="Appends each event to its user's history; an event_id the user's history "
    "already holds is a duplicate and changes nothing, so a retried batch is harmless. Events "
    "may arrive in any order; the next /rank folds them into the user's state. A 2xx means every "
    "event is in the store; a 503 means nothing was acknowledged: retry the same batch (the "
    "event ids make it safe).",
    responses={**VALIDATION_RESPONSES, **STORE_RESPONSES, **AUTH_RESPONSES},
)
async def post_events(
    body: EventsRequest, request: Request, services: ServicesDep, _: TokenDep
) -> EventsResponse:
    limit = services.settings.max_events_per_post
    if len(body.events) > limit:
        raise validation_error(
            ("body", "events"),
            f"List should have at most {limit} items (max_events_per_post), not {len(body.events)}",
            "too_long",
        )
    index = {name: i for i, name in enumerate(services.runtime.actions)}
    unknown = [
        (("body", "events", position, "action"),
         f"Input should be one of {list(index)}, not {event.action!r}",
         "enum")
        for position, event in enumerate(body.events)
        if event.action not in index
    ]  # fmt: skip
    if unknown:
        raise validation_errors(unknown)
    skew = services.settings.max_clock_skew_seconds
    latest = time.time() + skew
    future = [
        (("body", "events", position, "timestamp"),
         f"Input should be at most {latest:.0f} (server time + max_clock_skew_seconds={skew:g}); "
         f"got {event.timestamp}: an event cannot happen in the future",
         "less_than_equal")
        for position, event in enumerate(body.events)
        if event.timestamp > latest
    ]  # fmt: skip
    if future:
        raise validation_errors(future)
    budget = remaining_budget(
        services.settings.request_budget_seconds, request.scope.get(START_TIME_KEY)
    )
    try:
        async with asyncio.timeout(budget):
            result = await services.store.append_events(
                [
                    NewEvent(e.event_id, e.user_id, e.item_id, index[e.action], e.timestamp)
                    for e in body.events
                ]
            )
    except TimeoutError:
        # Maybe written, maybe not: not acknowledged, so the client retries (ids make it safe).
        raise StoreError(f"no answer from the store within {budget:.3f} s") from None
    services.activity.touch(e.user_id for e in body.events)
    ingested = services.metrics.events_ingested
    ingested.labels(outcome="accepted").inc(result.accepted)
    ingested.labels(outcome="duplicate").inc(result.duplicates)
    return EventsResponse(accepted=result.accepted, duplicates=result.duplicates)
