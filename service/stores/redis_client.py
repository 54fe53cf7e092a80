"""The Redis client of the store: one node, or a Redis Cluster reached through any of its nodes.

:func:`connect` is the one place a client is built; :data:`CLIENT_ERRORS` is what either client
raises when the store cannot answer.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import MaxConnectionsError, RedisClusterException, RedisError

from service.settings import RETRY_BACKOFF_CAP

Client = redis.Redis | RedisCluster

CLIENT_ERRORS = (RedisError, RedisClusterException)
"""What the clients raise when the store cannot answer; the cluster client's own errors (a slot
with no master: ``SlotNotCoveredError``, no node reachable at start) are not RedisErrors."""


def torn_connection(error: BaseException) -> bool:
    """Whether ``error`` is redis-py failing on a connection that another task's retry tore down.

    The cluster client answers a connection error in a pipeline by disconnecting every
    connection of the client, including ones other tasks are writing on at that moment; those
    writes then fail inside redis-py with ``AttributeError: 'NoneType' object has no attribute
    'writelines'`` rather than a ``RedisError`` (seen with a master killed under traffic). It is
    the store failing, not a bug of ours, so callers treat it as one."""
    if not isinstance(error, AttributeError) or error.__traceback__ is None:
        return False
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return f"{os.sep}redis{os.sep}" in frame.tb_frame.f_code.co_filename


def connect(
    url: str,
    cluster: bool,
    max_connections: int,
    timeout_seconds: float,
    retries: int = 1,
    backoff_seconds: float = 0.01,
    cluster_retries: int | None = None,
) -> Client:
    """A pooled client of one node, or of a Redis Cluster reached through the node ``url`` names,
    with a socket timeout on every call and an explicit retry policy (redis-py's default retries
    up to 10 times with backoff, far past any request budget).

    ``rediss://`` URLs get TLS and ``redis://:password@host`` authenticates; redis-py reads both
    (and ``ssl_*`` query parameters) from the URL.

    The cluster client learns the other nodes from that one, routes each command by its key's
    slot, and follows MOVED/ASK redirections (resharding) and a failed-over master. It keeps
    serving the slots that have a master while others have none (``require_full_coverage``
    off): one node down fails only the users whose slots it holds. ``max_connections`` is per
    node on a cluster. ``cluster_retries`` replaces the retry count on a cluster (0: the
    first failure is final, without a backoff).

    A full pool makes a call wait for a connection, at most ``timeout_seconds`` (then it fails
    as the store failing), rather than fail at once: a burst of background state write-backs
    must not fail the requests behind it.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "decode_responses": False,
    }
    retry = Retry(
        ExponentialWithJitterBackoff(cap=backoff_seconds * RETRY_BACKOFF_CAP, base=backoff_seconds),
        retries,
    )
    if cluster:
        # The same policy as one node: redis-py's cluster default (3 retries, up to 1 s of
        # backoff) outlasts any request budget. A retry re-learns the slot map first (a
        # failover, a moved slot); MOVED/ASK redirections are followed apart from it.
        if cluster_retries is not None:
            retry = Retry(NoBackoff(), cluster_retries)
        return _RedisCluster.from_url(
            url, require_full_coverage=False, max_connections=max_connections, retry=retry,
            **options,
        )  # fmt: skip
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_seconds, retry=retry, **options
    )
    return redis.Redis.from_pool(pool)


class _RedisCluster(RedisCluster):
    """redis-py's (8.1) asyncio cluster client with two routing faults worked around.

    * It picks a command's routing policy before its first ``initialize()`` (and after each
      re-initialisation), while no default node is known: a keyed EVALSHA then goes to a
      random master and comes back MOVED, and enough concurrent MOVEDs make the client close
      every node's connections, including those other requests are using. So the topology is
      learnt first.
    * It follows an ASK redirection (a slot being resharded) by sending ASKING and then the
      command as two separate takes from the node's pool, which is first-in first-out: with
      more than one idle connection the command goes out on another connection than ASKING,
      the new master answers MOVED back, and the client bounces until "TTL exhausted". The
      nodes' pools are made last-in first-out (see :class:`_LastInFirstOutNode`).
    """

    async def initialize(self, *args: Any, **kwargs: Any) -> _RedisCluster:
        await super().initialize(*args, **kwargs)
        for node in self.nodes_manager.nodes_cache.values():
            if type(node) is ClusterNode:
                node.__class__ = _LastInFirstOutNode
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


class _LastInFirstOutNode(ClusterNode):
    """A node whose pool hands out the connection released last, so that the command after
    ASKING (taken with no await in between) reuses the connection that sent it, and makes a
    caller wait (a bounded time) for a connection when all are busy: redis-py's node pool
    raises at once, and has no blocking variant."""

    __slots__ = ()

    def release(self, connection: Any) -> None:
        if connection.should_reconnect():
            super().release(connection)
        else:
            self._free.appendleft(connection)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self._connection_available()
        return await super().execute_command(*args, **kwargs)

    async def execute_pipeline(self, commands: Any) -> bool:
        await self._connection_available()
        return await super().execute_pipeline(commands)

    async def _connection_available(self) -> None:
        """Return once ``acquire_connection`` will not raise (it is called with no await
        after this), or raise ``MaxConnectionsError`` after the socket timeout. It polls: the
        node's slots leave no room for a waiter queue, and the wait happens only when the
        pool is exhausted."""
        if self._free or len(self._connections) < self.max_connections:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.connection_kwargs.get("socket_timeout") or 0.0)
        while not self._free and len(self._connections) >= self.max_connections:
            if loop.time() >= deadline:
                raise MaxConnectionsError(f"no free connection to {self.name}")
            await asyncio.sleep(POOL_POLL_SECONDS)


POOL_POLL_SECONDS = 0.001
"""How often a call waiting for a cluster node's connection looks again."""
