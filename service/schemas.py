"""Wire format of the API (DESIGN §5). Fields may be added, never renamed.

Validation happens here, at the edge: ids are non-negative 64-bit integers (JSON integers, or a
number with no fraction such as 4718.0, which JSON Schema calls an integer too; no strings, no
booleans), candidate ids are unique. Limits that depend on settings or on the model
(``max_candidates``, ``max_events_per_post``, the action vocabulary) are checked by the routes
and written into the OpenAPI document by :func:`service.app.create_app`.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MAX_ID = 2**63 - 1
MAX_TIMESTAMP = 4_102_444_800.0
"""2100-01-01 in unix seconds: larger values are milliseconds or nonsense, not seconds."""
MAX_EVENT_ID_LENGTH = 128


def _integral_number(value: object) -> object:
    """4718.0 as 4718: JSON Schema's ``integer`` is any number without a fraction, and some JSON
    writers print one so. Anything else goes to strict validation as it is (a bool, a string or
    a fraction is refused there)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


IntegralNumber = BeforeValidator(_integral_number)
"""Put on a strict int field: it accepts what JSON Schema's ``integer`` does."""

Id = Annotated[
    int,
    Field(
        strict=True,
        ge=0,
        le=MAX_ID,
        description="Non-negative 64-bit integer id (a JSON integer, or a number with no "
        "fraction: 4718.0; no string or bool).",
    ),
    IntegralNumber,
]
Timestamp = Annotated[
    float,
    Field(
        strict=True,
        ge=0.0,
        le=MAX_TIMESTAMP,
        allow_inf_nan=False,
        description="Unix time in seconds (UTC), a JSON number.",
    ),
]


class _Strict(BaseModel):
    # Unknown fields are refused: a misspelt "candidates" must not be ignored silently.
    model_config = ConfigDict(extra="forbid")


class RankRequest(_Strict):
    user_id: Id = Field(description="The user to rank for; unknown users get an empty history.")
    candidate_ids: list[Id] = Field(
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="The candidate set, scored in one pass: 1..max_candidates unique item ids "
        "(max_candidates is in GET /model). Unknown ids are scored with out-of-vocabulary "
        "embeddings and counted in unknown_items.",
    )
    k: Annotated[int, Field(strict=True, ge=1, le=MAX_ID), IntegralNumber] | None = Field(
        default=None,
        description="Items to return, best first; fewer when the set is smaller. "
        "Omitted: the service's default_k (GET /model).",
    )
    request_time: Timestamp | None = Field(
        default=None,
        description="Unix seconds the request is scored at (time decay of the history is "
        "relative to it). Omitted: the server's clock. For replays and reproducible tests.",
    )

    @field_validator("candidate_ids")
    @classmethod
    def _unique(cls, ids: list[int]) -> list[int]:
        return unique_candidates(ids)


def unique_candidates(ids: list[int]) -> list[int]:
    """``ids`` when no id repeats; else a ValueError that names the repeated ids."""
    if len(set(ids)) != len(ids):
        duplicated = sorted(i for i, n in Counter(ids).items() if n > 1)
        shown = duplicated[:20]
        more = f" and {len(duplicated) - len(shown)} more" if len(duplicated) > len(shown) else ""
        raise ValueError(f"candidate_ids must be unique; duplicated ids: {shown}{more}")
    return ids


class RankedItem(BaseModel):
    item_id: int = Field(description="Candidate id, as sent.")
    score: float = Field(
        description="Ranking score: p(impression) · Σ_a w_a p(a | impression) with the model's "
        "fusion weights (GET /model; default p(impression)·p(click | impression))."
    )
    probabilities: dict[str, float] = Field(
        description="Per objective of the model's vocabulary (GET /model lists them): "
        "p(impression), then p(action | impression); impression, click, long_view and like in "
        "the default vocabulary."
    )


class RankResponse(BaseModel):
    model_version: str = Field(description="Version of the model that scored the request.")
    items: list[RankedItem] = Field(description="min(k, len(candidate_ids)) items, best first.")
    unknown_items: int = Field(description="Candidates not in the catalogue (scored as OOV).")
    history_length: int = Field(
        description="Behaviour events in the user's state: the most recent max_history at most."
    )
    state_cache: Literal["hit", "miss", "stale", "degraded"] = Field(
        description="hit: cached state used as is; stale: newer events folded into it (and "
        "events past max_history folded out); miss: encoded from the whole window; degraded: "
        "the state store did not answer in time, scored from this worker's recent copy of the "
        "state or an empty one."
    )


class EventIn(_Strict):
    event_id: str = Field(
        strict=True,
        min_length=1,
        max_length=MAX_EVENT_ID_LENGTH,
        description="Client-chosen id, unique per user: a re-posted id is a duplicate and "
        "changes nothing, so retries are safe.",
    )
    user_id: Id = Field(description="The user who acted.")
    item_id: Id = Field(description="The item acted on (ids outside the catalogue are kept).")
    action: str = Field(
        strict=True,
        description="Action name from the model's action vocabulary (GET /model, 'actions').",
    )
    timestamp: Timestamp = Field(
        description="When it happened, unix seconds. Order does not matter: a late event with "
        "an old timestamp is folded with its own time weight."
    )


class EventsRequest(_Strict):
    events: list[EventIn] = Field(
        min_length=1,
        description="1..max_events_per_post events (max_events_per_post is in GET /model).",
    )


class EventsResponse(BaseModel):
    accepted: int = Field(description="Events appended to their user's history.")
    duplicates: int = Field(description="Events whose event_id the user's history already had.")


MIN_ATTRIBUTE = -(2**63)

AttributeValue = Annotated[
    int,
    Field(
        strict=True,
        ge=MIN_ATTRIBUTE,
        le=MAX_ID,
        description="Raw attribute value, a 64-bit JSON integer; one outside the field's "
        "vocabulary (GET /model, catalogue.item_fields) is out-of-vocabulary for that field.",
    ),
    IntegralNumber,
]


class ItemIn(_Strict):
    item_id: Id = Field(description="The item; new ids are added, known ones replaced.")
    attributes: dict[str, AttributeValue | None] = Field(
        description="Raw attributes by field name (GET /model, catalogue.item_fields), e.g. "
        '{"category": 3, "author": 1207}. They replace the item\'s attributes as a whole: a '
        "field not given (or null) is out-of-vocabulary, not kept from before."
    )


class ItemsRequest(_Strict):
    items: list[ItemIn] = Field(
        min_length=1,
        description="1..max_items_per_put items (max_items_per_put is in GET /model), written "
        "in order: an id given twice ends with the attributes of its last entry.",
    )


class ItemFeatures(BaseModel):
    item_id: int = Field(description="The item, as sent.")
    oov_fields: list[str] = Field(
        description="Attributes given with a value outside the field's vocabulary: that field "
        "is scored out-of-vocabulary, the others as given."
    )
    missing_fields: list[str] = Field(
        description="Fields of the model the item was not given (or given as null): "
        "out-of-vocabulary too."
    )


class ItemsResponse(BaseModel):
    upserted: int = Field(description="Items written: the distinct ids of the request.")
    items: list[ItemFeatures] = Field(
        description="Per item written, in the order of its first entry (with the attributes of "
        "its last): its OOV fields."
    )


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="Where: ['body', 'candidate_ids', 3], ...")
    field: str = Field(description="The offending field as a path: 'candidate_ids[3]'.")
    msg: str = Field(description="What is wrong, naming the field.")
    type: str = Field(description="Machine-readable error type (pydantic's).")


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationIssue] = Field(description="Every problem found, one per field.")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong.")


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field(description="Always 'ok': the process answers.")


class ReadyResponse(BaseModel):
    status: Literal["ready"] = Field(
        description="The model is loaded: the worker can answer /rank (degraded while the store "
        "is down, so a store outage never takes every replica out of the Service)."
    )
    model_version: str = Field(description="The model version served.")
    store: Literal["ok", "unavailable"] = Field(
        description="Whether the state store answered a ping just now (informational)."
    )


class Limits(BaseModel):
    max_candidates: int = Field(description="Largest candidate_ids list /rank accepts.")
    max_events_per_post: int = Field(description="Largest events list /events accepts.")
    max_items_per_put: int = Field(description="Largest items list PUT /items accepts.")
    default_k: int = Field(description="Items /rank returns when k is omitted.")
    max_id: int = Field(default=MAX_ID, description="Largest user or item id (2^63 - 1).")
    max_timestamp: float = Field(
        default=MAX_TIMESTAMP, description="Largest event timestamp, unix seconds (2100-01-01)."
    )
    max_clock_skew_seconds: float = Field(
        description="An event timestamp further than this in the future (server clock) is a 409."
    )
    max_body_bytes: int = Field(description="Largest request body; larger is a 413.")
    max_history: int = Field(
        description="Events of a user's history the state covers (the most recent by arrival); "
        "older ones are dropped from the log."
    )
    dedup_window: int = Field(
        description="Event ids remembered per user: a re-posted id among the user's last "
        "dedup_window events is a duplicate."
    )


class CatalogueInfo(BaseModel):
    base_items: int = Field(
        description="Items of the model's own catalogue; version and state_version cover these "
        "only, not the items added or changed through PUT /items."
    )
    item_fields: list[str] = Field(description="Attributes PUT /items sets.")
    cache_ttl_seconds: float = Field(
        description="An item update is ranked with on every worker within this time."
    )
    updates_rewrite_states: Literal[False] = Field(
        default=False,
        description="Always false: an event is folded into its user's state with the features "
        "its item has when the event is folded; an item update applies to events folded after "
        "it and does not rewrite states already cached.",
    )


class ModelInfo(BaseModel):
    version: str = Field(description="The model version served.")
    net: str = Field(
        description="The network served, by registry name: ifa, ifa_decay, ifa_channel "
        "(exact-match channel on the category), ifa_channel_decay, ..."
    )
    channel: dict[str, list[str] | list[int]] | None = Field(
        default=None,
        description="The exact-match channel: its item fields and one-hot slots per field "
        "(rows of S past the key dimension); null without one.",
    )
    objectives: list[str] = Field(description="Probability columns: impression, then actions.")
    actions: list[str] = Field(description="The action vocabulary /events accepts.")
    fusion: dict[str, float] = Field(description="Weights of p(action | imp) in the score.")
    heads: int = Field(description="Attention heads of the user state.")
    key_dim: int = Field(
        description="Rows of S per head: the key dimension plus the channel's slots, if any."
    )
    value_dim: int = Field(description="Value dimension per head (columns of S).")
    time_decay: bool = Field(description="Whether the state decays with event age.")
    state_bytes: int = Field(description="Size of one cached user state.")
    store: str = Field(description="State store backend: memory or redis.")
    program_format: str = Field(
        description="Program format the model runs in: aoti, torchscript, export or eager."
    )
    precision: str = Field(
        description="The scorer's arithmetic: fp32, or bf16 (objective towers in bfloat16)."
    )
    limits: Limits = Field(description="Limits the API enforces.")
    catalogue: CatalogueInfo = Field(
        description="Item features: the model's catalogue, overridden and extended by the item "
        "table (PUT /items)."
    )


VALIDATION_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ValidationErrorResponse, "description": "Malformed JSON body."},
    422: {
        "model": ValidationErrorResponse,
        "description": "A field is invalid; each issue names it (loc, field, msg).",
    },
}
STORE_RESPONSES: dict[int | str, dict[str, object]] = {
    413: {"model": ErrorResponse, "description": "The body is larger than max_body_bytes."},
    503: {
        "model": ErrorResponse,
        "description": "Unavailable now (state store, worker overloaded, request budget spent); "
        "retry after Retry-After seconds.",
    },
}
