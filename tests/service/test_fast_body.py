"""The fast decoders of /rank and /events bodies (service.api.fast_body) against FastAPI's own
decoding and validation: they accept only bodies pydantic accepts and build the same model."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from service.api.fast_body import (
    EVENT_FIELDS,
    EVENTS_FIELDS,
    RANK_FIELDS,
    RANK_REQUIRED,
    decode_events,
    decode_rank,
)
from service.schemas import (
    MAX_EVENT_ID_LENGTH,
    MAX_ID,
    MAX_TIMESTAMP,
    EventIn,
    EventsRequest,
    RankRequest,
)
from tests.support import T0

ACTIONS = ["impression", "click", "long_view", "like"]


# -- the decoders against pydantic ---------------------------------------------------------


def typed(value: Any) -> Any:
    """``value`` with the type of every leaf, so that 5 and 5.0 (or 0.0 and -0.0) differ."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return (
            type(value).__name__,
            sorted(value.model_fields_set),
            value.__pydantic_extra__,
            {name: typed(getattr(value, name)) for name in fields},
        )
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, repr(value))


def validated(model: type[BaseModel], body: bytes) -> BaseModel | None:
    """What FastAPI's own path makes of a JSON body (stdlib json, then pydantic), None if it
    refuses it."""
    try:
        data = json.loads(body)
    except ValueError:  # not JSON, or not in a Unicode encoding
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def check_agrees(
    decode: Callable[[bytes], BaseModel | None], model: type[BaseModel], body: bytes
) -> BaseModel | None:
    fast = decode(body)
    if fast is not None:
        expected = validated(model, body)
        assert expected is not None, f"the fast path accepts what pydantic refuses: {body!r}"
        assert typed(fast) == typed(expected), body
    return fast


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
edge_ids = st.sampled_from(
    [0, 1, MAX_ID, MAX_ID + 1, -1, 2**64 - 1, 2**64, 10**30, -(2**63), -(2**63) - 1, -(10**30)]
)
ids = st.integers(0, 40) | edge_ids | st.integers(-(2**66), 2**66)
edge_times = st.sampled_from(
    [0, 0.0, -0.0, 1, T0, MAX_TIMESTAMP, int(MAX_TIMESTAMP), int(MAX_TIMESTAMP) + 1,
     MAX_TIMESTAMP + 1e-6, -1e-300, 5e-324, 1e300, math.inf, -math.inf, math.nan, 10**30]
)  # fmt: skip
timestamps = (
    edge_times | st.floats(0, MAX_TIMESTAMP) | st.integers(0, int(MAX_TIMESTAMP)) | st.floats()
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a value of the right kind (right or wrong in its bounds), sometimes anything."""
    return st.one_of(good, good, good, anything)


def with_stray_keys(body: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    extra = st.dictionaries(st.sampled_from(["K", "candidates", "extra", ""]), anything, max_size=1)
    return st.one_of(body, body, body, st.builds(lambda b, e: {**b, **e}, body, extra), anything)


rank_bodies = with_stray_keys(
    st.fixed_dictionaries(
        {},
        optional={
            "user_id": mostly(ids),
            "candidate_ids": mostly(
                st.lists(ids, max_size=5) | st.lists(st.integers(0, 6), max_size=6)
            ),
            "k": mostly(st.none() | st.integers(-1, 60) | edge_ids),
            "request_time": mostly(st.none() | timestamps),
        },
    )
)
event_ids = (
    st.text(max_size=5)
    | st.integers(MAX_EVENT_ID_LENGTH - 1, MAX_EVENT_ID_LENGTH + 1).map(lambda n: "e" * n)
    | st.integers(MAX_EVENT_ID_LENGTH - 1, MAX_EVENT_ID_LENGTH + 1).map(lambda n: "\U0001f600" * n)
)
event_objects = with_stray_keys(
    st.fixed_dictionaries(
        {},
        optional={
            "event_id": mostly(event_ids),
            "user_id": mostly(ids),
            "item_id": mostly(ids),
            "action": mostly(st.sampled_from([*ACTIONS, "poke", ""])),
            "timestamp": mostly(timestamps),
        },
    )
)
events_bodies = with_stray_keys(
    st.fixed_dictionaries({}, optional={"events": mostly(st.lists(event_objects, max_size=3))})
)


@st.composite
def encoded(draw: st.DrawFn, bodies: st.SearchStrategy[Any]) -> bytes:
    """A body as a client might send it: JSON (NaN and Infinity included) in UTF-8 mostly, in
    another Unicode encoding or with a byte-order mark sometimes."""
    text = json.dumps(draw(bodies), ensure_ascii=draw(st.booleans()))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32"]))
    return text.encode(encoding, errors="surrogatepass")


# Number tokens as written, not as Python would print them: long mantissas, exponents, -0.
number_tokens = st.from_regex(r"\A-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,22})?([eE][+-]?[0-9]{1,3})?\Z")


@st.composite
def rank_with_tokens(draw: st.DrawFn) -> bytes:
    user, candidate, request_time = (draw(number_tokens) for _ in range(3))
    body = f'{{"user_id": {user}, "candidate_ids": [{candidate}], "request_time": {request_time}}}'
    return body.encode()


@st.composite
def events_with_tokens(draw: st.DrawFn) -> bytes:
    item, timestamp = draw(number_tokens), draw(number_tokens)
    event = (
        f'{{"event_id": "e", "user_id": 1, "item_id": {item}, "action": "click", '
        f'"timestamp": {timestamp}}}'
    )
    return f'{{"events": [{event}]}}'.encode()


def test_the_fast_path_knows_every_field_of_the_models() -> None:
    assert set(RankRequest.model_fields) == RANK_FIELDS
    assert {n for n, f in RankRequest.model_fields.items() if f.is_required()} == RANK_REQUIRED
    assert set(EventsRequest.model_fields) == EVENTS_FIELDS
    assert set(EventIn.model_fields) == EVENT_FIELDS
    assert all(f.is_required() for f in EventIn.model_fields.values())
    for model in (RankRequest, EventsRequest, EventIn):
        assert model.model_config.get("extra") == "forbid"


@given(body=encoded(rank_bodies) | rank_with_tokens() | st.binary(max_size=12))
@settings(max_examples=1500, deadline=None)
def test_rank_decoder_accepts_only_what_pydantic_accepts_with_the_same_values(body: bytes) -> None:
    check_agrees(decode_rank, RankRequest, body)


@given(body=encoded(events_bodies) | events_with_tokens() | st.binary(max_size=12))
@settings(max_examples=1500, deadline=None)
def test_events_decoder_accepts_only_what_pydantic_accepts_with_the_same_values(
    body: bytes,
) -> None:
    check_agrees(decode_events, EventsRequest, body)


valid_ids = st.integers(0, MAX_ID)
valid_times = st.floats(0, MAX_TIMESTAMP) | st.integers(0, int(MAX_TIMESTAMP))
valid_rank = st.fixed_dictionaries(
    {
        "user_id": valid_ids,
        "candidate_ids": st.lists(valid_ids, min_size=1, max_size=20, unique=True),
    },
    optional={"k": st.none() | st.integers(1, MAX_ID), "request_time": st.none() | valid_times},
)
valid_events = st.fixed_dictionaries(
    {
        "events": st.lists(
            st.fixed_dictionaries(
                {
                    "event_id": st.text(min_size=1, max_size=MAX_EVENT_ID_LENGTH),
                    "user_id": valid_ids,
                    "item_id": valid_ids,
                    "action": st.text(),
                    "timestamp": valid_times,
                }
            ),
            min_size=1,
            max_size=5,
        )
    }
)


@given(body=valid_rank)
@settings(max_examples=300, deadline=None)
def test_every_valid_rank_body_takes_the_fast_path(body: dict[str, Any]) -> None:
    assert check_agrees(decode_rank, RankRequest, json.dumps(body).encode()) is not None


@given(body=valid_events, ensure_ascii=st.booleans())
@settings(max_examples=300, deadline=None)
def test_every_valid_events_body_takes_the_fast_path(
    body: dict[str, Any], ensure_ascii: bool
) -> None:
    content = json.dumps(body, ensure_ascii=ensure_ascii).encode()
    assert check_agrees(decode_events, EventsRequest, content) is not None


def test_a_large_candidate_set_is_decoded_as_sent() -> None:
    candidates = list(range(MAX_ID - 999, MAX_ID + 1))
    body = json.dumps({"user_id": 3, "candidate_ids": candidates, "k": 10}).encode()
    decoded = check_agrees(decode_rank, RankRequest, body)
    assert isinstance(decoded, RankRequest)
    assert decoded.candidate_ids == candidates
