"""Behaviour log and state cache backends behind one :class:`~service.stores.base.Store`."""

from __future__ import annotations

from service.settings import Settings
from service.stores.base import Store


def open_store(settings: Settings) -> Store:
    """The backend the settings name; nothing connects until the first operation."""
    if settings.store == "redis":
        from service.stores.redis import RedisStore

        return RedisStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            max_connections=settings.redis_max_connections,
            timeout_seconds=settings.redis_timeout_seconds,
            cluster=settings.redis_cluster,
        )
    from service.stores.memory import MemoryStore

    return MemoryStore()
