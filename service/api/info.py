"""GET /model: what is served and the limits the API enforces."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ServicesDep
from service.schemas import CatalogueInfo, Limits, ModelInfo
from service.state import state_bytes

router = APIRouter(tags=["operations"])


@router.get("/model", response_model=ModelInfo, summary="Model version, vocabulary and limits")
async def model_info(services: ServicesDep) -> ModelInfo:
    runtime, settings = services.runtime, services.settings
    return ModelInfo(
        version=runtime.version,
        net=runtime.model.manifest.net,
        channel=runtime.model.manifest.channel,
        objectives=list(runtime.objectives),
        actions=list(runtime.actions),
        fusion=runtime.fusion,
        heads=runtime.heads,
        key_dim=runtime.key_dim,
        value_dim=runtime.value_dim,
        time_decay=bool((runtime.decay_rates != 0).any()),
        state_bytes=state_bytes(runtime.heads, runtime.key_dim, runtime.value_dim),
        store=settings.store,
        program_format=runtime.model.program_format,
        precision=runtime.model.precision,
        limits=Limits(
            max_candidates=settings.max_candidates,
            max_events_per_post=settings.max_events_per_post,
            max_items_per_put=settings.max_items_per_put,
            default_k=settings.default_k,
            max_clock_skew_seconds=settings.max_clock_skew_seconds,
            max_body_bytes=settings.max_body_bytes,
            max_history=services.ranker.max_history,
            dedup_window=settings.dedup_window,
        ),
        catalogue=CatalogueInfo(
            base_items=len(runtime.catalogue),
            item_fields=list(services.ranker.items.attribute_names),
            cache_ttl_seconds=settings.item_cache_ttl_seconds,
        ),
    )
