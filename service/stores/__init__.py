"""Behaviour log and state cache backends behind one :class:`~service.stores.base.Store`."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from service.settings import Settings
from service.stores.base import HistoryLimits, Store


def open_store(settings: Settings, max_history: int) -> Store:
    """The backend the settings name; nothing connects until the first operation.

    ``max_history`` is the resolved history cap (the setting, or the model's training window).
    """
    limits = HistoryLimits(
        max_history=max_history,
        dedup_window=settings.dedup_window,
        dedup_seconds=settings.dedup_seconds,
        retention_seconds=settings.user_retention_seconds,
    )
    if settings.store == "redis":
        from service.stores.redis import RedisStore

        return RedisStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            max_connections=settings.redis_max_connections,
            timeout_seconds=settings.redis_timeout_seconds,
            retries=settings.redis_retries,
            backoff_seconds=settings.redis_retry_backoff_seconds,
            limits=limits,
            cluster=settings.redis_cluster,
        )
    from service.stores.memory import MemoryStore

    return MemoryStore(limits=limits)


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
