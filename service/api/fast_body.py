"""A fast path for the JSON bodies of POST /rank and POST /events.

FastAPI decodes a body with the stdlib ``json`` and validates it with pydantic; for a /rank with a
thousand candidates that is a visible share of a request's CPU. Here a well-formed body is decoded
with orjson and checked by hand against the rules of :mod:`service.schemas`, and the request model
is built from it without a second validation. The check accepts only bodies pydantic accepts, with
the same values: anything else (a bad id, any float where an int belongs, even an integral 4718.0
that pydantic accepts, a missing or an unknown key, NaN, bytes orjson refuses, ...) goes to
FastAPI's own decoding and validation, so every answer but the common case is the one FastAPI gives.

Only the decoding step changes. FastAPI still reads the body, decides from the content-type whether
it is JSON, solves the dependencies (the bearer token), calls the route and handles its errors;
the routes and the OpenAPI document are those of a plain :class:`fastapi.routing.APIRoute`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.schemas import (
    MAX_EVENT_ID_LENGTH,
    MAX_ID,
    MAX_TIMESTAMP,
    EventIn,
    EventsRequest,
    RankRequest,
)

Decoder = Callable[[bytes], BaseModel | None]

# Spelt out rather than read from the models: a field added to a model must not be accepted here
# before this module checks it (tests compare these with the models' fields).
RANK_FIELDS = frozenset({"user_id", "candidate_ids", "k", "request_time"})
RANK_REQUIRED = frozenset({"user_id", "candidate_ids"})
EVENTS_FIELDS = frozenset({"events"})
EVENT_FIELDS = frozenset({"event_id", "user_id", "item_id", "action", "timestamp"})

_INT_ONLY = {int}


def decode_rank(body: bytes) -> RankRequest | None:
    """The RankRequest pydantic would make of ``body``, or None unless it is plainly valid."""
    data = _json_object(body)
    if data is None or not RANK_REQUIRED <= data.keys() <= RANK_FIELDS:
        return None
    if not _is_id(data["user_id"]) or not _are_unique_ids(data["candidate_ids"]):
        return None
    k = data.get("k")
    if k is not None and not (type(k) is int and 1 <= k <= MAX_ID):
        return None
    request_time = data.get("request_time")
    if request_time is not None:
        seconds = _timestamp(request_time)
        if seconds is None:
            return None
        data["request_time"] = seconds
    # Built from the keys the body has, so that the fields set are those validation would set.
    return RankRequest.model_construct(**data)


def decode_events(body: bytes) -> EventsRequest | None:
    """The EventsRequest pydantic would make of ``body``, or None unless it is plainly valid."""
    data = _json_object(body)
    if data is None or data.keys() != EVENTS_FIELDS:
        return None
    raw = data["events"]
    if type(raw) is not list or not raw:
        return None
    events = []
    for item in raw:
        event = _event(item)
        if event is None:
            return None
        events.append(event)
    return EventsRequest.model_construct(events=events)


DECODERS: dict[Any, Decoder] = {RankRequest: decode_rank, EventsRequest: decode_events}
"""The fast decoder of each request model; a route whose body is another model has none."""


class FastBodyRoute(APIRoute):
    """An APIRoute whose JSON body, when its model has a decoder, is decoded by it first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        decode = DECODERS.get(model)
        if decode is None:
            return handler

        async def handle(request: Request) -> Response:
            return await handler(_FastJsonRequest(request, decode))

        return handle


class _FastJsonRequest(Request):
    """The request FastAPI's handler reads: the same scope and channels, a faster ``json()``.

    FastAPI calls ``json()`` once, after it has read the body itself and only when the
    content-type says JSON, so reading, size limits and the content-type rules stay its own. The
    model returned for a plain body passes FastAPI's validation as it is (an instance of the
    body's model is not validated again).
    """

    def __init__(self, request: Request, decode: Decoder) -> None:
        super().__init__(request.scope, request.receive, request._send)
        self._decode = decode

    async def json(self) -> Any:
        decoded = self._decode(await self.body())
        return decoded if decoded is not None else await super().json()


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if type(data) is dict else None


def _is_id(value: object) -> bool:
    # type() rather than isinstance(): a bool is an int, and pydantic's strict mode refuses it.
    return type(value) is int and 0 <= value <= MAX_ID


def _are_unique_ids(value: object) -> bool:
    """A non-empty list of distinct ids; builtins over the list rather than a loop per id."""
    return (
        type(value) is list
        and len(value) > 0
        and set(map(type, value)) == _INT_ONLY
        and min(value) >= 0
        and max(value) <= MAX_ID
        and len(set(value)) == len(value)
    )


def _timestamp(value: object) -> float | None:
    """The float pydantic makes of a Timestamp (strict: an int is accepted, a bool is not)."""
    # orjson refuses NaN and Infinity; out-of-range numbers fail the bounds anyway.
    if (type(value) is float or type(value) is int) and 0 <= value <= MAX_TIMESTAMP:
        return float(value)
    return None


def _event(value: object) -> EventIn | None:
    if type(value) is not dict or value.keys() != EVENT_FIELDS:
        return None
    event_id, action = value["event_id"], value["action"]
    if type(event_id) is not str or not 0 < len(event_id) <= MAX_EVENT_ID_LENGTH:
        return None
    if type(action) is not str or not _is_id(value["user_id"]) or not _is_id(value["item_id"]):
        return None
    timestamp = _timestamp(value["timestamp"])
    if timestamp is None:
        return None
    return EventIn.model_construct(
        event_id=event_id,
        user_id=value["user_id"],
        item_id=value["item_id"],
        action=action,
        timestamp=timestamp,
    )
