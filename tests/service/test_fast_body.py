"""The fast path for /rank and /events bodies (service.api.fast_body) against FastAPI's own
decoding and validation: it accepts only bodies pydantic accepts and builds the same model, and
every answer (status, headers, body) and the OpenAPI document stay what they are without it.

"Without it" is the same app with the routes' handlers of a plain APIRoute.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from service.api.fast_body import (
    EVENT_FIELDS,
    EVENTS_FIELDS,
    RANK_FIELDS,
    RANK_REQUIRED,
    FastBodyRoute,
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
from service.settings import Settings
from tests.support import T0, make_settings, service_client

MAX_CANDIDATES = 50
MAX_EVENTS = 5
BODY_LIMIT = 4096
TOKEN = "fast-body-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
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


# -- the app with and without the fast path ------------------------------------------------


class Service:
    """The app with its lifespan running, called from synchronous tests (Hypothesis)."""

    def __init__(self, portal: BlockingPortal, client: httpx.AsyncClient) -> None:
        self.portal = portal
        self.client = client
        self.app: FastAPI = client.app  # type: ignore[attr-defined]

    def post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.portal.call(partial(self.client.post, path, content=content, headers=headers))

    def get(self, path: str) -> httpx.Response:
        return self.portal.call(self.client.get, path)


@contextmanager
def running(settings: Settings, fast: bool) -> Iterator[Service]:
    with (
        pytest.MonkeyPatch.context() as patch,
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(service_client(settings)) as client,
    ):
        service = Service(portal, client)
        if not fast:
            patch.setattr(FastBodyRoute, "get_route_handler", APIRoute.get_route_handler)
            # FastAPI builds a router's handlers when the app first routes a request through it.
            for path in ("/rank", "/events"):
                service.post(path, b"", JSON)
            patch.undo()
        yield service


@pytest.fixture(scope="module")
def apps(artifact_dir: Path) -> Iterator[tuple[Service, Service]]:
    """(fast, plain): the same settings, each app with a memory store of its own that sees the
    same requests in the same order."""
    settings = make_settings(
        artifact_dir,
        max_candidates=MAX_CANDIDATES,
        max_events_per_post=MAX_EVENTS,
        max_body_bytes=BODY_LIMIT,
        api_token=TOKEN,
        # The 422 for a future event names the server's clock, which moves between the two calls.
        max_clock_skew_seconds=1e12,
    )
    with running(settings, fast=True) as fast, running(settings, fast=False) as plain:
        yield fast, plain


@pytest.fixture
def stdlib_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Bodies decoded by Starlette's own Request.json (stdlib json), as they happen."""
    calls: list[bytes] = []
    original = Request.json

    async def spy(self: Request) -> Any:
        calls.append(await self.body())
        return await original(self)

    monkeypatch.setattr(Request, "json", spy)
    return calls


Answer = tuple[int, list[tuple[str, str]], bytes]


def answer(client: Service, path: str, content: bytes, headers: dict[str, str]) -> Answer:
    response = client.post(path, content=content, headers=headers)
    return response.status_code, response.headers.multi_items(), response.content


def both(
    apps: tuple[Service, Service], path: str, content: bytes, headers: dict[str, str]
) -> tuple[Answer, Answer]:
    fast, plain = apps
    return answer(fast, path, content, headers), answer(plain, path, content, headers)


def rank(**fields: Any) -> bytes:
    return json.dumps({"user_id": 1, "candidate_ids": [1, 2, 3], **fields}).encode()


def event(**fields: Any) -> dict[str, Any]:
    return {
        "event_id": "e1",
        "user_id": 1,
        "item_id": 5,
        "action": "click",
        "timestamp": T0,
        **fields,
    }


def events(*items: Any) -> bytes:
    return json.dumps({"events": list(items)}).encode()


def utf8(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


UTF8_BOM = b"\xef\xbb\xbf"
# (path, body, headers, whether the fast path decodes it)
CASES: list[tuple[str, bytes, dict[str, str], bool]] = [
    ("/rank", rank(), JSON, True),
    ("/rank", rank(k=2, request_time=T0), JSON, True),
    ("/rank", rank(k=None, request_time=None), JSON, True),
    ("/rank", rank(request_time=int(T0)), JSON, True),
    ("/rank", rank(request_time=int(MAX_TIMESTAMP)), JSON, True),
    ("/rank", rank(request_time=-0.0), JSON, True),
    ("/rank", rank(request_time=0), JSON, True),
    ("/rank", rank(user_id=MAX_ID, candidate_ids=[MAX_ID, 0], k=MAX_ID), JSON, True),
    ("/rank", rank(candidate_ids=list(range(MAX_CANDIDATES))), JSON, True),
    ("/rank", rank(candidate_ids=list(range(MAX_CANDIDATES + 1))), JSON, True),
    ("/rank", b' {\n "user_id" : 2 ,\t"candidate_ids" : [ 7 , 8 ] }\r\n', JSON, True),
    ("/rank", b'{"user_id": -1, "user_id": 4, "candidate_ids": [1]}', JSON, True),
    ("/rank", rank(), {"content-type": "application/json; charset=utf-8"}, True),
    ("/rank", rank(), {"content-type": "Application/JSON"}, True),
    ("/rank", rank(), {"content-type": "application/vnd.ifa+json"}, True),
    ("/rank", rank(), {"content-type": "text/plain"}, False),
    ("/rank", rank(), {"content-type": "application/jsonx"}, False),
    ("/rank", rank(), {}, False),
    ("/rank", rank(), {**JSON, **AUTH}, True),
    ("/rank", rank(user_id=True), JSON, False),
    ("/rank", rank(user_id=False), JSON, False),
    ("/rank", rank(candidate_ids=[True]), JSON, False),
    ("/rank", rank(k=True), JSON, False),
    ("/rank", rank(request_time=True), JSON, False),
    ("/rank", rank(user_id=1.0), JSON, False),
    ("/rank", rank(candidate_ids=[1, 2.0]), JSON, False),
    ("/rank", rank(k=2.0), JSON, False),
    ("/rank", rank(k=0), JSON, False),
    ("/rank", rank(k=MAX_ID + 1), JSON, False),
    ("/rank", rank(user_id=-1), JSON, False),
    ("/rank", rank(candidate_ids=[4, -1]), JSON, False),
    ("/rank", rank(user_id=MAX_ID + 1), JSON, False),
    ("/rank", rank(candidate_ids=[MAX_ID + 1]), JSON, False),
    ("/rank", rank(candidate_ids=[2**64]), JSON, False),
    ("/rank", rank(user_id=10**30), JSON, False),
    ("/rank", rank(candidate_ids=[-(10**30)]), JSON, False),
    ("/rank", rank(user_id="7"), JSON, False),
    ("/rank", rank(candidate_ids=["7"]), JSON, False),
    ("/rank", rank(request_time="1700000000"), JSON, False),
    ("/rank", rank(candidate_ids=[1, 2, 2, 3, 3]), JSON, False),
    ("/rank", rank(candidate_ids=[]), JSON, False),
    ("/rank", rank(candidate_ids=5), JSON, False),
    ("/rank", rank(candidate_ids={"1": 1}), JSON, False),
    ("/rank", rank(candidate_ids=[[1]]), JSON, False),
    ("/rank", rank(candidate_ids=[{"id": 1}]), JSON, False),
    ("/rank", rank(user_id={"id": 1}), JSON, False),
    ("/rank", rank(user_id=None), JSON, False),
    ("/rank", rank(candidate_ids=None), JSON, False),
    ("/rank", rank(candidates=[1]), JSON, False),
    ("/rank", rank(K=3), JSON, False),
    ("/rank", json.dumps(without(json.loads(rank()), "user_id")).encode(), JSON, False),
    ("/rank", json.dumps(without(json.loads(rank()), "candidate_ids")).encode(), JSON, False),
    ("/rank", rank(request_time=MAX_TIMESTAMP + 1), JSON, False),
    ("/rank", rank(request_time=-1e-9), JSON, False),
    ("/rank", rank(request_time=1.7e12), JSON, False),
    ("/rank", rank(request_time=math.nan), JSON, False),
    ("/rank", rank(request_time=math.inf), JSON, False),
    ("/rank", rank(request_time=-math.inf), JSON, False),
    ("/rank", b'{"user_id": 1, "candidate_ids": [1], "request_time": 1e400}', JSON, False),
    ("/rank", b'{"user_id": 1, "candidate_ids": [1], "k": 1e400}', JSON, False),
    ("/rank", b'{"user_id": 1, "candidate_ids": [1], "extra": "\xff"}', JSON, False),
    ("/rank", b'{"user_id": 1, "candidate_ids": [1], "\xe9": 1}', JSON, False),
    ("/rank", b'{"user_id": 1, "candidate_ids": [1], "x": "\\ud800"}', JSON, False),
    ("/rank", rank().decode().encode("utf-16"), JSON, False),
    ("/rank", rank().decode().encode("utf-32"), JSON, False),
    ("/rank", UTF8_BOM + rank(), JSON, False),
    ("/rank", b"not json", JSON, False),
    ("/rank", b'{"user_id": 1, "candidate_ids": [1,', JSON, False),
    ("/rank", b'{"user_id": 1 2}', JSON, False),
    ("/rank", b"", JSON, False),
    ("/rank", b"[1, 2]", JSON, False),
    ("/rank", b"null", JSON, False),
    ("/rank", b"17", JSON, False),
    ("/rank", b'"user_id"', JSON, False),
    ("/rank", b"[" * 5000 + b"]" * 5000, JSON, False),
    ("/rank", rank(candidate_ids=list(range(2000))), JSON, False),  # larger than BODY_LIMIT
    ("/events", events(event()), {**JSON, **AUTH}, True),
    ("/events", events(event()), {**JSON, **AUTH}, True),  # the same event id again
    (
        "/events",
        events(*(event(event_id=f"b{i}", user_id=i) for i in range(MAX_EVENTS))),
        {**JSON, **AUTH},
        True,
    ),
    (
        "/events",
        events(*(event(event_id=f"c{i}") for i in range(MAX_EVENTS + 1))),
        {**JSON, **AUTH},
        True,
    ),
    ("/events", events(event(event_id="d1", action="poke")), {**JSON, **AUTH}, True),
    ("/events", events(event(event_id="d2", action="")), {**JSON, **AUTH}, True),
    ("/events", events(event(event_id="x" * MAX_EVENT_ID_LENGTH)), {**JSON, **AUTH}, True),
    ("/events", events(event(event_id="é" * MAX_EVENT_ID_LENGTH)), {**JSON, **AUTH}, True),
    (
        "/events",
        utf8({"events": [event(event_id="\U0001f600" * MAX_EVENT_ID_LENGTH)]}),
        {**JSON, **AUTH},
        True,
    ),
    (
        "/events",
        utf8({"events": [event(event_id="\U0001f600" * (MAX_EVENT_ID_LENGTH + 1))]}),
        {**JSON, **AUTH},
        False,
    ),
    ("/events", events(event(event_id="d3", timestamp=int(T0))), {**JSON, **AUTH}, True),
    ("/events", events(event(event_id="d4", timestamp=0)), {**JSON, **AUTH}, True),
    (
        "/events",
        events(event(event_id="d5", user_id=MAX_ID, item_id=MAX_ID)),
        {**JSON, **AUTH},
        True,
    ),
    ("/events", events(event(event_id="d6")), JSON, True),  # no token: the 401 is FastAPI's
    ("/events", events(event(event_id="d6")), {**JSON, "authorization": "Bearer nope"}, True),
    ("/events", events(event(event_id="d6")), {**JSON, "authorization": "Basic " + TOKEN}, True),
    ("/events", events(event(event_id="d7", user_id=-1)), JSON, False),  # no token, bad body
    ("/events", b"not json", JSON, False),
    ("/events", events(event(event_id="x" * (MAX_EVENT_ID_LENGTH + 1))), {**JSON, **AUTH}, False),
    ("/events", events(event(event_id="")), {**JSON, **AUTH}, False),
    ("/events", events(event(event_id=7)), {**JSON, **AUTH}, False),
    ("/events", events(event(event_id=None)), {**JSON, **AUTH}, False),
    ("/events", events(event(action=3)), {**JSON, **AUTH}, False),
    ("/events", events(event(action=None)), {**JSON, **AUTH}, False),
    ("/events", events(event(timestamp=True)), {**JSON, **AUTH}, False),
    ("/events", events(event(timestamp="1700000000")), {**JSON, **AUTH}, False),
    ("/events", events(event(timestamp=math.nan)), {**JSON, **AUTH}, False),
    ("/events", events(event(timestamp=-1)), {**JSON, **AUTH}, False),
    ("/events", events(event(timestamp=MAX_TIMESTAMP * 2)), {**JSON, **AUTH}, False),
    ("/events", events(event(timestamp=None)), {**JSON, **AUTH}, False),
    ("/events", events(event(user_id=True)), {**JSON, **AUTH}, False),
    ("/events", events(event(item_id=5.0)), {**JSON, **AUTH}, False),
    ("/events", events(event(item_id=-5)), {**JSON, **AUTH}, False),
    ("/events", events(event(user_id=MAX_ID + 1)), {**JSON, **AUTH}, False),
    ("/events", events(event(item_id=2**64)), {**JSON, **AUTH}, False),
    ("/events", events(event(extra=1)), {**JSON, **AUTH}, False),
    ("/events", events(without(event(), "timestamp")), {**JSON, **AUTH}, False),
    ("/events", events(without(event(), "event_id")), {**JSON, **AUTH}, False),
    ("/events", events(event(), "click"), {**JSON, **AUTH}, False),
    ("/events", events(event(), [event()]), {**JSON, **AUTH}, False),
    ("/events", events(), {**JSON, **AUTH}, False),
    ("/events", json.dumps({"events": event()}).encode(), {**JSON, **AUTH}, False),
    ("/events", json.dumps({"events": [event()], "more": []}).encode(), {**JSON, **AUTH}, False),
    ("/events", json.dumps({"event": [event()]}).encode(), {**JSON, **AUTH}, False),
    ("/events", b'{"events": [{"event_id": "\xff", "user_id": 1}]}', {**JSON, **AUTH}, False),
    ("/events", UTF8_BOM + events(event(event_id="d8")), {**JSON, **AUTH}, False),
    ("/events", events(event(event_id="d9")).decode().encode("utf-16"), {**JSON, **AUTH}, False),
    ("/events", events(event(event_id="d10")), {**AUTH, "content-type": "text/plain"}, False),
]


@pytest.mark.parametrize(("path", "content", "headers", "decoded_fast"), CASES)
def test_every_answer_is_the_one_fastapi_gives(
    apps: tuple[Service, Service],
    stdlib_decodes: list[bytes],
    path: str,
    content: bytes,
    headers: dict[str, str],
    decoded_fast: bool,
) -> None:
    fast, plain = apps
    with_fast_path = answer(fast, path, content, headers)
    fast_stdlib = len(stdlib_decodes)
    without_fast_path = answer(plain, path, content, headers)
    plain_stdlib = len(stdlib_decodes) - fast_stdlib
    assert with_fast_path == without_fast_path
    # Neither passes vacuously: the plain app decodes every JSON body itself, the fast one only
    # what its check refuses.
    assert fast_stdlib == (0 if decoded_fast else plain_stdlib)
    if decoded_fast:
        assert plain_stdlib == 1


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(["/rank", "/events"]))
    body = draw(encoded(rank_bodies if path == "/rank" else events_bodies))
    headers = {**JSON, **AUTH} if draw(st.integers(0, 9)) else JSON
    return path, body, headers


@given(request=requests())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_bodies_get_the_answer_fastapi_gives(
    apps: tuple[Service, Service], request: tuple[str, bytes, dict[str, str]]
) -> None:
    with_fast_path, without_fast_path = both(apps, *request)
    assert with_fast_path == without_fast_path


def test_the_openapi_document_is_unchanged(apps: tuple[Service, Service]) -> None:
    fast, plain = apps
    with_fast_path, without_fast_path = fast.get("/openapi.json"), plain.get("/openapi.json")
    assert with_fast_path.status_code == 200
    assert with_fast_path.content == without_fast_path.content
    assert fast.app.openapi() == plain.app.openapi()


# -- reading the body ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_body_is_read_from_the_server_once(artifact_dir: Path) -> None:
    """The body comes in chunks, and the server's receive then waits (as a real server's does
    until the client goes away): a second read of the stream would hang past the request
    budget and answer 503."""
    body = json.dumps({"user_id": 1, "candidate_ids": list(range(40)), "k": 3}).encode()
    chunks = [body[i : i + 50] for i in range(0, len(body), 50)]
    received: list[int] = []
    never = anyio.Event()

    async def receive() -> dict[str, Any]:
        if len(received) < len(chunks):
            received.append(len(received))
            more = len(received) < len(chunks)
            return {"type": "http.request", "body": chunks[len(received) - 1], "more_body": more}
        await never.wait()
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/rank",
        "raw_path": b"/rank",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"service")],
        "client": ("127.0.0.1", 1),
        "server": ("service", 80),
    }
    settings = make_settings(artifact_dir, request_budget_seconds=2.0)
    async with service_client(settings) as client:
        app = client.app  # type: ignore[attr-defined]
        with anyio.fail_after(10):
            await app({**scope, "state": {}}, receive, send)
    assert sent[0]["status"] == 200, sent
    assert len(received) == len(chunks)
    assert len(json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["items"]) == 3
