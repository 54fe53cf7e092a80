"""The Redis client of the store: one node, or a Redis Cluster reached through any of its nodes.

:func:`connect` is the one place a client is built; :data:`CLIENT_ERRORS` is what either client
raises when the store cannot answer.
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisClusterException, RedisError

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
    node on a cluster. ``cluster_retries`` replaces the cluster client's own retry count.
    """
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "decode_responses": False,
    }
    if cluster:
        # The cluster client retries a command on another attempt after re-learning the slot
        # map (a failover, a moved slot); its bounded default (3 attempts) is kept, since the
        # ASK/MOVED handling below depends on its own connection handling.
        if cluster_retries is not None:
            options["retry"] = Retry(NoBackoff(), cluster_retries)
        return _RedisCluster.from_url(url, require_full_coverage=False, **options)
    retry = Retry(
        ExponentialWithJitterBackoff(cap=max(backoff_seconds * 8, 0.0), base=backoff_seconds),
        retries,
    )
    return redis.Redis.from_url(url, retry=retry, **options)


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
    ASKING (taken with no await in between) reuses the connection that sent it."""

    __slots__ = ()

    def release(self, connection: Any) -> None:
        if connection.should_reconnect():
            super().release(connection)
        else:
            self._free.appendleft(connection)
