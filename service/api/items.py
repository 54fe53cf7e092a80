"""PUT /items: add or replace items of the live catalogue, with their raw attributes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from service.api.deps import ServicesDep, TokenDep
from service.errors import validation_error, validation_errors
from service.middleware import START_TIME_KEY, remaining_budget
from service.schemas import (
    AUTH_RESPONSES,
    STORE_RESPONSES,
    VALIDATION_RESPONSES,
    ItemFeatures,
    ItemsRequest,
    ItemsResponse,
)
from service.stores.base import ItemAttributes, StoreError

router = APIRouter(tags=["items"])


@router.put(
    "/items",
    response_model=ItemsResponse,
    summary="Add or replace items",
    description="Upserts items with their raw attributes (category, author, ...: the fields "
    "GET /model lists under catalogue.item_fields). A new item is then ranked with its "
    "attributes' embeddings, its own id embedding still untrained; an item of the model's "
    "catalogue is overridden. A value outside a field's vocabulary makes that field, and only "
    "that one, out-of-vocabulary: the response lists those fields per item. Every worker ranks "
    "with an update within catalogue.cache_ttl_seconds; states already cached are not rewritten "
    "(events are folded with the features their item has when they are folded). A 2xx means "
    "every item is in the store; a 503 means none is acknowledged: retry the same batch.",
    responses={**VALIDATION_RESPONSES, **STORE_RESPONSES, **AUTH_RESPONSES},
)
async def put_items(
    body: ItemsRequest, request: Request, services: ServicesDep, _: TokenDep
) -> ItemsResponse:
    limit = services.settings.max_items_per_put
    if len(body.items) > limit:
        raise validation_error(
            ("body", "items"),
            f"List should have at most {limit} items (max_items_per_put), not {len(body.items)}",
            "too_long",
        )
    catalogue = services.ranker.items
    fields = catalogue.attribute_names
    unknown = [
        (("body", "items", position, "attributes", name),
         f"Unknown item attribute {name!r}; the model's item fields are {list(fields)}",
         "extra_forbidden")
        for position, item in enumerate(body.items)
        for name in item.attributes
        if name not in fields
    ]  # fmt: skip
    if unknown:
        raise validation_errors(unknown)
    items: dict[int, ItemAttributes] = {
        item.item_id: {name: value for name, value in item.attributes.items() if value is not None}
        for item in body.items
    }
    budget = remaining_budget(
        services.settings.request_budget_seconds, request.scope.get(START_TIME_KEY)
    )
    try:
        async with asyncio.timeout(budget):
            reports = await catalogue.put(items)
    except TimeoutError:
        # Maybe written, maybe not: not acknowledged, so the client retries (an upsert is safe).
        raise StoreError(f"no answer from the store within {budget:.3f} s") from None
    return ItemsResponse(
        upserted=len(reports),
        items=[
            ItemFeatures(
                item_id=r.item_id, oov_fields=r.oov_fields, missing_fields=r.missing_fields
            )
            for r in reports
        ],
    )
