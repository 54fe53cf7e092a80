"""Behaviour log and state cache backends behind one :class:`~service.stores.base.Store`."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

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
        )
    from service.stores.memory import MemoryStore

    return MemoryStore()


def store_location(settings: Settings) -> str:
    """Where the store the settings name keeps its data, fit for a log line (no password)."""
    if settings.store == "redis":
        return f"{redacted_url(settings.redis_url)}, key prefix {settings.redis_prefix!r}"
    return "this process's memory, lost when it exits"


def redacted_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
