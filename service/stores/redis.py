"""The Redis store: one pooled ``redis.asyncio`` client (hiredis parser) for a single node or a
Redis Cluster, pipelined reads, and Lua scripts for the operations that must be atomic.

Reads of a rank request are one script call (state, profile and log length together).
Keys of one user share the hash tag ``{u:<id>}`` so that, on Redis Cluster, a user's log, event
ids, profile and states live in one slot and the scripts may touch them together (every
script's KEYS are one user's):

* ``<prefix>:{u:<id>}:log`` — the behaviour log, fixed-size records appended in arrival order
  (see :mod:`service.stores.records`);
* ``<prefix>:{u:<id>}:ids`` — the set of event ids already appended (idempotency);
* ``<prefix>:{u:<id>}:profile`` — hash of profile attributes;
* ``<prefix>:{u:<id>}:state:<version>`` — hash {c: cursor, s: state blob} with a TTL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from service.stores.base import AppendResult, NewEvent, SeedHistories, StoreError, UserSnapshot
from service.stores.records import RECORD_BYTES, EventLog, pack_record, unpack_log
from service.stores.redis_client import CLIENT_ERRORS, connect

# KEYS: log, ids. ARGV: event id, record, event id, record, ... Returns the count appended.
# SADD and APPEND in one script: an event id is marked seen iff its record is in the log.
_APPEND_SCRIPT = """
local accepted = 0
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('APPEND', KEYS[1], ARGV[i + 1])
    accepted = accepted + 1
  end
end
return accepted
"""

# KEYS: state. ARGV: cursor, blob, ttl seconds. Writes unless the cached cursor is ≥ ours.
_PUT_STATE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'c')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'c', ARGV[1], 's', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: state, profile, log. ARGV: ttl seconds. Returns {state blob or nil, profile fields and
# values, log bytes}. One command instead of a pipeline of four (less client work per request),
# and atomic: the log length is read together with the state it is compared to.
_SNAPSHOT_SCRIPT = """
local blob = redis.call('HGET', KEYS[1], 's')
if blob then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return {blob, redis.call('HGETALL', KEYS[2]), redis.call('STRLEN', KEYS[3])}
"""

_SEED_CHUNK_USERS = 512
"""Users per seeding pipeline: large enough to amortise round trips, small enough to stream."""


class RedisStore:
    def __init__(
        self,
        url: str,
        prefix: str = "ifa",
        max_connections: int = 64,
        timeout_seconds: float = 1.0,
        cluster: bool = False,
    ) -> None:
        self.prefix = prefix
        self._client = connect(url, cluster, max_connections, timeout_seconds)
        # Script objects run by EVALSHA and load themselves on NOSCRIPT (on a cluster, SCRIPT
        # LOAD reaches every master); in pipelines, _evalsha_pipelined does the same.
        self._append = self._client.register_script(_APPEND_SCRIPT)
        self._put_state = self._client.register_script(_PUT_STATE_SCRIPT)
        self._snapshot = self._client.register_script(_SNAPSHOT_SCRIPT)

    def _key(self, user_id: int, part: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:{part}"

    # -- behaviour log ----------------------------------------------------------------------

    async def append_events(self, events: Sequence[NewEvent]) -> AppendResult:
        by_user: dict[int, list[bytes | str]] = defaultdict(list)
        for event in events:
            by_user[event.user_id] += [
                event.event_id,
                pack_record(event.item_id, event.action, event.timestamp),
            ]
        calls = [
            ([self._key(user_id, "log"), self._key(user_id, "ids")], args)
            for user_id, args in by_user.items()
        ]
        try:
            counts = await self._evalsha_pipelined(self._append, calls)
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis append failed: {error}") from error
        accepted = sum(int(c) for c in counts)
        return AppendResult(accepted=accepted, duplicates=len(events) - accepted)

    async def _evalsha_pipelined(
        self, script: AsyncScript, calls: Sequence[tuple[list[str], list[bytes | str]]]
    ) -> list[Any]:
        """``script`` once per (keys, args), all in one pipeline: one round trip on a single node,
        one per node (all at once) on a cluster, whose pipeline groups commands by node. Each
        call's keys are one user's, so each call is one slot.

        A node that has not seen the script (a new, restarted or promoted master) answers
        NOSCRIPT to its calls; only those calls are sent again, once the script is loaded on
        every master, so no call runs twice and the counts stay exact.
        """
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(2):
            # The cluster pipeline refuses pipe.evalsha(); the raw command routes by key.
            async with self._client.pipeline(transaction=False) as pipe:
                for i in pending:
                    keys, args = calls[i]
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                answers = await pipe.execute(raise_on_error=False)
            missing = []
            for i, answer in zip(pending, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    missing.append(i)
                elif isinstance(answer, Exception):
                    raise answer
                else:
                    results[i] = answer
            if not missing:
                return results
            await self._client.script_load(script.script)
            pending = missing
        raise NoScriptError("script still unknown to a node after loading it on every master")

    async def read_events(self, user_id: int, cursor: int) -> EventLog:
        key = self._key(user_id, "log")
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                # One MULTI so that the length and the bytes agree.
                pipe.getrange(key, cursor * RECORD_BYTES, -1)
                pipe.strlen(key)
                data, length = await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis log read failed: {error}") from error
        end = int(length) // RECORD_BYTES
        if cursor >= end:
            data = b""
        return unpack_log(bytes(data), end=end)

    async def put_profile(self, user_id: int, attributes: Mapping[str, int]) -> None:
        if not attributes:
            return
        try:
            await self._client.hset(
                self._key(user_id, "profile"),
                mapping=_hash_fields(attributes),
            )
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis profile write failed: {error}") from error

    async def seed(self, histories: SeedHistories) -> int:
        user_ids = histories.user_ids.tolist()
        written = 0
        try:
            for chunk_start in range(0, len(user_ids), _SEED_CHUNK_USERS):
                async with self._client.pipeline(transaction=False) as pipe:
                    chunk = range(chunk_start, min(chunk_start + _SEED_CHUNK_USERS, len(user_ids)))
                    for u in chunk:
                        start, stop = histories.bounds[u], histories.bounds[u + 1]
                        blob = histories.records[start:stop].tobytes()
                        # NX: a user whose log exists (an earlier seed, live events) keeps it.
                        pipe.set(self._key(user_ids[u], "log"), blob, nx=True)
                        profile = histories.profiles.get(user_ids[u])
                        if profile:
                            pipe.hset(
                                self._key(user_ids[u], "profile"), mapping=_hash_fields(profile)
                            )
                    results = await pipe.execute()
                written += sum(1 for r in results if r is True)
            leftover = set(histories.profiles) - set(user_ids)
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in leftover:
                    pipe.hset(
                        self._key(user_id, "profile"),
                        mapping=_hash_fields(histories.profiles[user_id]),
                    )
                await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis seed failed: {error}") from error
        return written

    # -- state cache ------------------------------------------------------------------------

    async def put_state(
        self, version: str, user_id: int, blob: bytes, cursor: int, ttl_seconds: int
    ) -> bool:
        try:
            won = await self._put_state(
                keys=[self._key(user_id, f"state:{version}")], args=[cursor, blob, ttl_seconds]
            )
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis state write failed: {error}") from error
        return bool(won)

    async def snapshot(self, version: str, user_id: int, ttl_seconds: int) -> UserSnapshot:
        keys = [
            self._key(user_id, f"state:{version}"),
            self._key(user_id, "profile"),
            self._key(user_id, "log"),
        ]
        try:
            blob, profile, length = await self._snapshot(keys=keys, args=[ttl_seconds])
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis snapshot failed: {error}") from error
        return UserSnapshot(
            state=bytes(blob) if blob is not None else None,
            profile=_decode_profile(dict(zip(profile[::2], profile[1::2], strict=True))),
            log_length=int(length) // RECORD_BYTES,
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis unreachable: {error}") from error

    async def close(self) -> None:
        await self._client.aclose()

    async def delete_prefix(self) -> int:
        """Delete every key under this store's prefix (tests and benchmarks clean up with it)."""
        deleted = 0
        async for key in self._client.scan_iter(match=f"{self.prefix}:*", count=1000):
            deleted += int(await self._client.delete(key))
        return deleted


def _hash_fields(attributes: Mapping[str, int]) -> dict[Any, Any]:
    """Profile attributes as HSET fields (redis-py's mapping type is invariant in its keys)."""
    return {str(name): int(value) for name, value in attributes.items()}


def _decode_profile(raw: dict[Any, Any]) -> dict[str, int]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in (raw or {}).items()
    }
