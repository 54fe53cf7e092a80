"""What the write routes (/events, PUT /items) share: the batch-size limit and a store write that
is acknowledged only when it finished within the request budget."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from service.errors import validation_error
from service.middleware import START_TIME_KEY, remaining_budget
from service.settings import Settings
from service.stores.base import StoreError

T = TypeVar("T")


def check_batch_size(field: str, count: int, limit: int, setting: str) -> None:
    """A 422 naming the field and the setting when a batch holds more than ``limit`` entries."""
    if count > limit:
        raise validation_error(
            ("body", field),
            f"List should have at most {limit} items ({setting}), not {count}",
            "too_long",
        )


async def within_budget(write: Awaitable[T], request: Request, settings: Settings) -> T:
    """``write``'s result, or a :class:`StoreError` (503) once the request budget is spent."""
    budget = remaining_budget(settings.request_budget_seconds, request.scope.get(START_TIME_KEY))
    try:
        async with asyncio.timeout(budget):
            return await write
    except TimeoutError:
        # Maybe written, maybe not: not acknowledged, so the client retries (the write must be
        # safe to repeat: event ids, upserts).
        raise StoreError(f"no answer from the store within {budget:.3f} s") from None
