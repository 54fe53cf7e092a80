"""PUT /items: add or replace items of the live catalogue, with their raw attributes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import ServicesDep, TokenDep
from service.api.writes import check_batch_size, within_budget
from service.errors import validation_errors
from service.schemas import (
    STORE_RESPONSES,
    VALIDATION_RESPONSES,
    ItemFeatures,
    ItemsRequest,
    ItemsResponse,
)
from service.stores.base import ItemAttributes

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
    responses={**VALIDATION_RESPONSES, **STORE_RESPONSES},
)
async def put_items(
    body: ItemsRequest, request: Request, services: ServicesDep, _: TokenDep
) -> ItemsResponse:
    limit = services.settings.max_items_per_put
    check_batch_size("items", len(body.items), limit, "max_items_per_put")
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
    reports = await within_budget(catalogue.put(items), request, services.settings)
    return ItemsResponse(
        upserted=len(reports),
        items=[
            ItemFeatures(
                item_id=r.item_id, oov_fields=r.oov_fields, missing_fields=r.missing_fields
            )
            for r in reports
        ],
    )
