"""POST /events: append behaviour events, idempotently by event id."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ServicesDep
from service.errors import validation_error, validation_errors
from service.schemas import STORE_RESPONSES, VALIDATION_RESPONSES, EventsRequest, EventsResponse
from service.stores.base import NewEvent

router = APIRouter(tags=["events"])


@router.post(
    "/events",
    response_model=EventsResponse,
    summary="Record behaviour events",
    description="Appends each event to its user's history; an event_id the user's history "
    "already holds is a duplicate and changes nothing, so a retried batch is harmless. Events "
    "may arrive in any order; the next /rank folds them into the user's state.",
    responses={**VALIDATION_RESPONSES, **STORE_RESPONSES},
)
async def post_events(body: EventsRequest, services: ServicesDep) -> EventsResponse:
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
    result = await services.store.append_events(
        [
            NewEvent(e.event_id, e.user_id, e.item_id, index[e.action], e.timestamp)
            for e in body.events
        ]
    )
    ingested = services.metrics.events_ingested
    ingested.labels(outcome="accepted").inc(result.accepted)
    ingested.labels(outcome="duplicate").inc(result.duplicates)
    return EventsResponse(accepted=result.accepted, duplicates=result.duplicates)
