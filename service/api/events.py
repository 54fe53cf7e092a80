"""POST /events: append behaviour events, idempotently by event id."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from fastapi import APIRouter, Request

from service.api.deps import ServicesDep, TokenDep
from service.api.fast_body import FastBodyRoute
from service.api.writes import check_batch_size, within_budget
from service.errors import Conflict, validation_errors
from service.schemas import (
    STORE_RESPONSES,
    VALIDATION_RESPONSES,
    EventIn,
    EventsRequest,
    EventsResponse,
    ValidationErrorResponse,
)
from service.stores.base import AppendResult, NewEvent

router = APIRouter(tags=["events"], route_class=FastBodyRoute)


@router.post(
    "/events",
    response_model=EventsResponse,
    summary="Record behaviour events",
    description="Appends each event to its user's history; an event_id the user's history "
    "already holds is a duplicate and changes nothing, so a retried batch is harmless. Events "
    "may arrive in any order; the next /rank folds them into the user's state. A 2xx means every "
    "event is in the store; a 503 means nothing was acknowledged: retry the same batch (the "
    "event ids make it safe).",
    responses={
        **VALIDATION_RESPONSES,
        **STORE_RESPONSES,
        409: {
            "model": ValidationErrorResponse,
            "description": "An event's timestamp is later than the server's clock allows "
            "(server time + max_clock_skew_seconds, GET /model), each issue naming the event; or "
            "a user has more events in the post than dedup_window (GET /model), so that a retry "
            "of the post could not be recognised.",
        },
    },
)
async def post_events(
    body: EventsRequest, request: Request, services: ServicesDep, _: TokenDep
) -> EventsResponse:
    limit = services.settings.max_events_per_post
    check_batch_size("events", len(body.events), limit, "max_events_per_post")
    serving = services.model.current  # one version's vocabulary for the whole batch
    index = {name: i for i, name in enumerate(serving.runtime.actions)}
    unknown = [
        (("body", "events", position, "action"),
         f"Input should be one of {list(index)}, not {event.action!r}",
         "enum")
        for position, event in enumerate(body.events)
        if event.action not in index
    ]  # fmt: skip
    if unknown:
        raise validation_errors(unknown)
    check_retry_recognisable(body.events, services.settings.dedup_window)
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
        # A schema-valid body (the schema's bound is 2100) that the server's clock refuses.
        raise Conflict(future)

    async def append() -> AppendResult:
        # Stored actions are the store's indices, which a later model reads by name.
        to_store = (
            await serving.runtime.agree_layout(services.store, serving.ranker.max_history)
        ).to_store
        events = [
            NewEvent(e.event_id, e.user_id, e.item_id, to_store[e.action], e.timestamp)
            for e in body.events
        ]
        return await services.store.append_events(events)

    result = await within_budget(append(), request, services.settings)
    services.activity.touch(e.user_id for e in body.events)
    ingested = services.metrics.events_ingested
    ingested.labels(outcome="accepted").inc(result.accepted)
    ingested.labels(outcome="duplicate").inc(result.duplicates)
    return EventsResponse(accepted=result.accepted, duplicates=result.duplicates)


def check_retry_recognisable(events: Sequence[EventIn], dedup_window: int) -> None:
    """A 409 when one user has more events in the post than the idempotency window holds.

    The store recognises a re-post by the digests of a user's last ``dedup_window`` events, so a
    retry of a post with more events of one user would append its oldest ones a second time.
    """
    per_user = Counter(event.user_id for event in events)
    over = sorted((user, n) for user, n in per_user.items() if n > dedup_window)
    if over:
        raise Conflict(
            [
                (("body", "events"),
                 f"user {user} has {n} events in this post; at most dedup_window={dedup_window} "
                 "per user per post, so that a retried post is recognised: split the post",
                 "too_long")
                for user, n in over
            ]
        )  # fmt: skip
