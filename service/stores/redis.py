"""The Redis store: one pooled ``redis.asyncio`` client (hiredis parser) for a single node or a
Redis Cluster, pipelined reads, and Lua scripts for the operations that must be atomic.

Reads of a rank request are one script call (state, profile and log bounds together).
Keys of one user share the hash tag ``{u:<id>}`` so that, on Redis Cluster, a user's log, event
ids, profile and states live in one slot and the scripts may touch them together (every
script's KEYS are one user's):

* ``<prefix>:{u:<id>}:log`` — the behaviour log, fixed-size records (see
  :mod:`service.stores.records`) in arrival order, a ring once full; it holds log positions
  [start, end);
* ``<prefix>:{u:<id>}:meta`` — hash {start: log position of the log's oldest record, head: its
  slot in a full log};
* ``<prefix>:{u:<id>}:eids`` — packed 12-byte entries (event-id digest, second appended) of the
  last ``dedup_window`` events (:mod:`service.stores.idempotency`);
* ``<prefix>:{u:<id>}:profile`` — hash of profile attributes;
* ``<prefix>:{u:<id>}:state:<version>`` — hash {c: cursor, s: state blob} with a TTL.

Four keys are not a user's: ``<prefix>:layout`` (the store's action vocabulary and
max_history, JSON: :mod:`service.stores.layout`; a log record's action indexes its vocabulary),
``<prefix>:active`` (sorted set, user -> latest activity, the users a rollout warms; bounded,
written once a second per worker), ``<prefix>:serving`` (hash, worker -> the state versions it
serves or warms and until when that holds: what a cleanup must keep) and
``<prefix>:rollout:cleaned:<state versions>`` (the lock that lets one worker delete the states
of the other versions after a rollout).

Items are not a user's: the item table is :data:`ITEM_SHARDS` hashes
``<prefix>:{i:<shard>}:items`` (shard = id mod ITEM_SHARDS), field = the decimal item id, value =
its attributes as a JSON object. A bulk lookup is one script call (HMGETs) over the shards it
touches on a single node, and on a cluster, where the shards' hash tags spread them over the
masters, one call per shard in one pipeline: a round trip per node, in parallel.

Bounded storage: a log keeps its last ``limits.keep`` records (the state's window and a quarter
window of slack for fold-outs, :class:`~service.stores.base.HistoryLimits`): once full it is a
ring of exactly keep · 20 bytes, written in place. Digests take ``dedup_window`` · 12 bytes. The
log, digests, meta and profile expire ``limits.retention_seconds`` after the user's last append
(each append refreshes them; reads do not), so a user who leaves costs nothing after that.

Every call has a socket timeout and an explicit retry policy (connection errors and timeouts,
jittered exponential backoff). Retries are safe: appends are idempotent by event id and state
writes are compare-and-sets.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import orjson
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from service.stores.base import (
    AppendResult,
    HistoryLimits,
    ItemAttributes,
    ItemsUnavailable,
    NewEvent,
    SeedHistories,
    StoreError,
    UserCount,
    UserSnapshot,
)
from service.stores.idempotency import ENTRY_BYTES, event_digest, remembered, unpack_entries
from service.stores.layout import StoreLayout, reconcile
from service.stores.records import RECORD_BYTES, EventLog, pack_record, unpack_log
from service.stores.redis_client import CLIENT_ERRORS, Client, connect

# KEYS: log, digests, meta. ARGV: keep, dedup window, dedup seconds, now (unix seconds),
# retention seconds, then digest, record, digest, record, ... Returns the count appended.
#
# The digest check and the log write are one script: a digest is remembered iff its record is in
# the log. Digests live in a packed string of 12-byte entries (8-byte digest, uint32 second
# appended), the entry of log position p at slot p mod window: a lookup is one plain
# string.find over at most window · 12 bytes; an entry counts while it is younger than dedup
# seconds (an empty, zero slot never does).
#
# The log is plain (records in position order) until it holds `keep` records; it is then
# rewritten once without slack (APPEND grows a string by doubling it) and becomes a ring: the
# record of position p at slot (head + p - start) mod keep, each new record written in place over
# the oldest, so the string never grows again. Meta holds start (position of the oldest record)
# and, for a ring, head (the slot of start). A plain log longer than `keep` (seeded, or a smaller
# max_history) is cut once to the last `keep`.
#
# The first write is a SETRANGE (a command Redis refuses when over maxmemory): a full Redis fails
# the script before it changes anything. The keys get the retention TTL (writes refresh it, reads
# do not). On a cluster, a script over a slot that is being migrated runs where all its keys are,
# and one missing key would send it back and forth: every key it names exists once it has run
# (meta is written even when unchanged), and the profile, which a user may lack, is not one of
# them (its TTL is refreshed by an EXPIRE beside the script).
_APPEND_SCRIPT = f"""
local record, entry = {RECORD_BYTES}, {ENTRY_BYTES}
local keep, window, horizon = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, retention = tonumber(ARGV[4]), tonumber(ARGV[5])
local start = tonumber(redis.call('HGET', KEYS[3], 'start') or '0')
local head = tonumber(redis.call('HGET', KEYS[3], 'head') or '-1')
local n = math.floor(redis.call('STRLEN', KEYS[1]) / record)
local digests = redis.call('GET', KEYS[2]) or ''
local full = window * entry
-- Slots this call wrote: what the copy in `digests` holds there is gone (an event a window ago).
local overwritten = {{}}

local function remembered(digest)
  local from = 1
  while true do
    local at = string.find(digests, digest, from, true)
    if not at then
      return false
    end
    if (at - 1) % entry == 0 and not overwritten[(at - 1) / entry] then
      local stamp = struct.unpack('<I4', digests, at + 8)
      if stamp > 0 and now - stamp < horizon then
        return true
      end
    end
    from = at + 1
  end
end

-- The log's records in position order (a ring is read from its head).
local function linear()
  local data = redis.call('GET', KEYS[1]) or ''
  if head <= 0 then
    return data
  end
  return string.sub(data, head * record + 1) .. string.sub(data, 1, head * record)
end

local function append_record(value)
  if head >= 0 and n ~= keep then
    -- A ring of another size (max_history changed): back to a plain log.
    redis.call('SET', KEYS[1], linear())
    head = -1
  end
  if head >= 0 then
    redis.call('SETRANGE', KEYS[1], head * record, value)
    head = (head + 1) % keep
    start = start + 1
  elseif n >= keep then
    local drop = n - keep + 1
    redis.call('SET', KEYS[1], string.sub(linear(), drop * record + 1) .. value)
    start, n, head = start + drop, keep, 0
  else
    redis.call('APPEND', KEYS[1], value)
    n = n + 1
    if n == keep then
      redis.call('SET', KEYS[1], redis.call('GET', KEYS[1]))
      head = 0
    end
  end
end

local stamp = struct.pack('<I4', now)
local fresh = {{}}
local accepted = 0
for i = 6, #ARGV, 2 do
  local digest = ARGV[i]
  if not fresh[digest] and not remembered(digest) then
    local slot = (start + n) % window
    redis.call('SETRANGE', KEYS[2], slot * entry, digest .. stamp)
    overwritten[slot] = true
    append_record(ARGV[i + 1])
    fresh[digest] = true
    accepted = accepted + 1
  end
end
if accepted > 0 then
  local size = redis.call('STRLEN', KEYS[2])
  if size > full then
    redis.call('SET', KEYS[2], string.sub(redis.call('GET', KEYS[2]), 1, full))
  elseif size == full and #digests < full then
    -- Just filled: rewritten once without the slack its growth left.
    redis.call('SET', KEYS[2], redis.call('GET', KEYS[2]))
  end
  if head >= 0 then
    redis.call('HSET', KEYS[3], 'start', string.format('%d', start), 'head', head)
  else
    redis.call('HSET', KEYS[3], 'start', string.format('%d', start))
    redis.call('HDEL', KEYS[3], 'head')
  end
  for k = 1, 3 do
    redis.call('EXPIRE', KEYS[k], retention)
  end
end
return accepted
"""

# KEYS: log, meta. ARGV: cursor, stop (-1: the end). Returns {first position read, log end,
# records}: the records at positions [max(cursor, start), min(stop, end)), in position order (a
# ring's range may wrap: two ranges), read together with the bounds they are relative to.
_READ_SCRIPT = f"""
local record = {RECORD_BYTES}
local start = tonumber(redis.call('HGET', KEYS[2], 'start') or '0')
local head = tonumber(redis.call('HGET', KEYS[2], 'head') or '-1')
local n = math.floor(redis.call('STRLEN', KEYS[1]) / record)
local stop = start + n
local first = math.max(tonumber(ARGV[1]), start)
local last = stop
if tonumber(ARGV[2]) >= 0 then
  last = math.min(tonumber(ARGV[2]), stop)
end
local data = ''
if first < last then
  local from = first - start
  if head >= 0 then
    from = (head + from) % n
  end
  local to = from + last - first
  if to <= n then
    data = redis.call('GETRANGE', KEYS[1], from * record, to * record - 1)
  else
    data = redis.call('GETRANGE', KEYS[1], from * record, -1) ..
           redis.call('GETRANGE', KEYS[1], 0, (to - n) * record - 1)
  end
end
return {{first, stop, data}}
"""

# KEYS: state. ARGV: cursor, blob, ttl seconds, replace (1 or 0). Writes unless the cached cursor
# is ≥ ours; with replace, writes anyway (the cached state was found wrong: its cursor means
# nothing).
_PUT_STATE_SCRIPT = """
if ARGV[4] ~= '1' then
  local current = redis.call('HGET', KEYS[1], 'c')
  if current and tonumber(current) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'c', ARGV[1], 's', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: state, profile, log, meta. ARGV: ttl seconds. Returns {state blob or nil, profile fields
# and values, log bytes, log start}. One command instead of a pipeline (less client work per
# request), and atomic: the log bounds are read together with the state they are compared to.
# The TTL is refreshed only once less than half of it is left: a read is not a write (no AOF
# record, no replication) on almost every request.
_SNAPSHOT_SCRIPT = """
local blob = redis.call('HGET', KEYS[1], 's')
if blob then
  local ttl = redis.call('TTL', KEYS[1])
  if ttl >= 0 and ttl * 2 < tonumber(ARGV[1]) then
    redis.call('EXPIRE', KEYS[1], ARGV[1])
  end
end
return {blob, redis.call('HGETALL', KEYS[2]), redis.call('STRLEN', KEYS[3]),
        tonumber(redis.call('HGET', KEYS[4], 'start') or '0')}
"""

# KEYS: shards of the item table. ARGV: per shard, its item ids space-separated. Returns each id's
# value (nil when absent), shard after shard. One argument per shard rather than one per id: the
# client packs a command's arguments one by one in Python, which for 1000 ids costs more than the
# round trip itself. HMGET takes the ids 1000 at a time (Lua's unpack has a stack limit).
_ITEMS_SCRIPT = """
local found = {}
for k = 1, #KEYS do
  local ids = {}
  for id in string.gmatch(ARGV[k], '%d+') do
    ids[#ids + 1] = id
  end
  for first = 1, #ids, 1000 do
    local values = redis.call('HMGET', KEYS[k], unpack(ids, first, math.min(first + 999, #ids)))
    for i = 1, #values do
      found[#found + 1] = values[i]
    end
  end
end
return found
"""

_APPEND_KEYS = ("log", "eids", "meta")
"""A user's keys the append script writes, in its KEYS order."""
# KEYS: layout record. ARGV: the record expected (empty: none), the record to write. A
# compare-and-set, so that the rule of service.stores.layout.reconcile stays in Python.
_SWAP_LAYOUT_SCRIPT = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

_LAYOUT_ATTEMPTS = 8
"""Compare-and-sets of the layout record before giving up: each loss means another worker
changed it in between, which happens only while workers start or roll out together."""

_SCAN_BATCH = 1000
"""Keys one SCAN call examines (its COUNT hint)."""

_CLEANUP_LOCK_SECONDS = 600
"""How long one worker's cleanup after a rollout stands for all (every worker asks for it within
its poll interval and warm-up of the same rollout)."""

_SEED_CHUNK_USERS = 512
"""Users per seeding pipeline: large enough to amortise round trips, small enough to stream."""

ITEM_SHARD_BACKOFF_SECONDS = 1.0
"""How long a cluster's item lookups leave a shard alone after its call failed (they answer
from the worker's cache meanwhile): a node that is down costs one timeout a second, not one
per request."""

ITEM_SHARDS = 16
"""Hashes the item table is spread over. Part of the key layout (changing it strands the items
stored): enough to spread a large catalogue over a cluster's masters (a key migrates whole when
a slot moves), few enough that a lookup of 1000 ids is 16 commands, not 1000."""


class RedisStore:
    def __init__(
        self,
        url: str,
        prefix: str = "ifa",
        max_connections: int = 64,
        timeout_seconds: float = 0.08,
        retries: int = 1,
        backoff_seconds: float = 0.01,
        limits: HistoryLimits | None = None,
        cluster: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prefix = prefix
        self.limits = limits or HistoryLimits()
        self._clock = clock
        """Unix seconds the digests are stamped with (and a retry is compared at)."""
        self._client = connect(
            url, cluster, max_connections, timeout_seconds, retries, backoff_seconds
        )
        # On a cluster, the item table is read and written through a client of its own that
        # does not retry: a cluster pipeline that meets a timeout or a lost connection with
        # retries left closes every connection of its client (redis-py 8.1), those that
        # concurrent requests are using included. An item lookup that fails falls back to the
        # features the worker has; the users' states never share its connections.
        self._shard_retry_at: defaultdict[int, float] = defaultdict(float)
        """Item shard -> monotonic time before which lookups do not ask it (cluster only)."""
        self._items_client = (
            connect(url, cluster, max_connections, timeout_seconds, cluster_retries=0)
            if cluster
            else self._client
        )
        # Script objects run by EVALSHA and load themselves on NOSCRIPT (on a cluster, SCRIPT
        # LOAD reaches every master); in pipelines, _evalsha_pipelined does the same.
        self._append = self._client.register_script(_APPEND_SCRIPT)
        self._read = self._client.register_script(_READ_SCRIPT)
        self._put_state = self._client.register_script(_PUT_STATE_SCRIPT)
        self._snapshot = self._client.register_script(_SNAPSHOT_SCRIPT)
        self._get_items = self._client.register_script(_ITEMS_SCRIPT)
        self._swap_layout = self._client.register_script(_SWAP_LAYOUT_SCRIPT)

    def _key(self, user_id: int, part: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:{part}"

    # -- behaviour log ----------------------------------------------------------------------

    async def append_events(self, events: Sequence[NewEvent]) -> AppendResult:
        limits = self.limits
        head: list[bytes | str | int] = [
            limits.keep,
            limits.dedup_window,
            limits.dedup_seconds,
            int(self._clock()),
            limits.retention_seconds,
        ]
        by_user: dict[int, list[bytes | str | int]] = defaultdict(list)
        for event in events:
            by_user[event.user_id] += [
                event_digest(event.event_id),
                pack_record(event.item_id, event.action, event.timestamp),
            ]
        calls = [
            ([self._key(user_id, part) for part in _APPEND_KEYS], head + args)
            for user_id, args in by_user.items()
        ]
        profiles = [
            ("EXPIRE", self._key(user_id, "profile"), limits.retention_seconds)
            for user_id in by_user
        ]
        try:
            counts = await self._evalsha_pipelined(self._append, calls, also=profiles)
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis append failed: {error}") from error
        accepted = sum(int(c) for c in counts)
        return AppendResult(accepted=accepted, duplicates=len(events) - accepted)

    async def _evalsha_pipelined(
        self,
        script: AsyncScript,
        calls: Sequence[tuple[list[str], list[bytes | str | int]]],
        client: Client | None = None,
        also: Sequence[tuple[str | int, ...]] = (),
        errors_answer: bool = False,
    ) -> list[Any]:
        """``script`` once per (keys, args), all in one pipeline: one round trip on a single node,
        one per node (all at once) on a cluster, whose pipeline groups commands by node. Each
        call's keys are one user's, so each call is one slot. ``client``: the one to send with
        (default: the store's main client). ``also``: commands sent in the same pipeline, once
        (they must be safe whether or not a call runs).

        A node that has not seen the script (a new, restarted or promoted master) answers
        NOSCRIPT to its calls; only those calls are sent again, once the script is loaded on
        every master, so no call runs twice and the counts stay exact. ``errors_answer``: a
        call that failed otherwise has its error as its result, rather than raising it.
        """
        client = client if client is not None else self._client
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(2):
            # The cluster pipeline refuses pipe.evalsha(); the raw command routes by key.
            async with client.pipeline(transaction=False) as pipe:
                for i in pending:
                    keys, args = calls[i]
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                for command in also:
                    pipe.execute_command(*command)
                answers = await pipe.execute(raise_on_error=False)
            answers, extra = answers[: len(pending)], answers[len(pending) :]
            also = ()
            for answer in extra:
                if isinstance(answer, Exception):
                    raise answer
            missing = []
            for i, answer in zip(pending, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    missing.append(i)
                elif isinstance(answer, Exception) and not errors_answer:
                    raise answer
                else:
                    results[i] = answer
            if not missing:
                return results
            try:
                await client.script_load(script.script)
            except CLIENT_ERRORS:
                if not errors_answer:
                    raise
                # Loaded on the masters that answered: their calls go again; a call on one
                # that did not fails on its own.
            pending = missing
        raise NoScriptError("script still unknown to a node after loading it on every master")

    async def read_events(self, user_id: int, cursor: int, stop: int | None = None) -> EventLog:
        keys = [self._key(user_id, "log"), self._key(user_id, "meta")]
        try:
            first, end, data = await self._read(
                keys=keys, args=[cursor, -1 if stop is None else stop]
            )
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis log read failed: {error}") from error
        return unpack_log(bytes(data), end=int(end), start=int(first))

    async def event_digests(self, user_id: int, start: int, stop: int) -> dict[int, str]:
        if stop <= start:
            return {}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hget(self._key(user_id, "meta"), "start")
                pipe.strlen(self._key(user_id, "log"))
                pipe.get(self._key(user_id, "eids"))
                log_start, length, packed = await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis event digest read failed: {error}") from error
        limits, now = self.limits, int(self._clock())
        entries = unpack_entries(packed or b"")
        end = int(log_start or 0) + int(length) // RECORD_BYTES
        found: dict[int, str] = {}
        for position in range(max(start, end - limits.dedup_window), min(stop, end)):
            slot = position % limits.dedup_window
            if slot < len(entries) and remembered(entries[slot][1], now, limits.dedup_seconds):
                found[position] = entries[slot][0].hex()
        return found

    async def put_profile(self, user_id: int, attributes: Mapping[str, int]) -> None:
        if not attributes:
            return
        key = self._key(user_id, "profile")
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=_hash_fields(attributes))
                pipe.expire(key, self.limits.retention_seconds)
                await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis profile write failed: {error}") from error

    async def seed(self, histories: SeedHistories) -> int:
        user_ids = histories.user_ids.tolist()
        retention = self.limits.retention_seconds
        written = 0
        try:
            for chunk_start in range(0, len(user_ids), _SEED_CHUNK_USERS):
                async with self._client.pipeline(transaction=False) as pipe:
                    chunk = range(chunk_start, min(chunk_start + _SEED_CHUNK_USERS, len(user_ids)))
                    sets: list[int] = []  # the SETs' places among the pipeline's results
                    for u in chunk:
                        start, stop = histories.bounds[u], histories.bounds[u + 1]
                        blob = histories.records[start:stop].tobytes()
                        # NX: a user whose log exists (an earlier seed, live events) keeps it.
                        sets.append(len(pipe))
                        pipe.set(self._key(user_ids[u], "log"), blob, nx=True, ex=retention)
                        profile = histories.profiles.get(user_ids[u])
                        if profile:
                            key = self._key(user_ids[u], "profile")
                            pipe.hset(key, mapping=_hash_fields(profile))
                            pipe.expire(key, retention)
                    results = await pipe.execute()
                written += sum(1 for i in sets if results[i] is True)
            leftover = set(histories.profiles) - set(user_ids)
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in leftover:
                    key = self._key(user_id, "profile")
                    pipe.hset(key, mapping=_hash_fields(histories.profiles[user_id]))
                    pipe.expire(key, retention)
                await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis seed failed: {error}") from error
        return written

    async def count_users(self, budget: int) -> UserCount:
        """SCAN for log keys under the prefix, ``budget`` keys examined at most: SCAN's cost is
        the whole keyspace's (other prefixes included), not the matches'."""
        pattern = f"{_glob_escape(self.prefix)}:{{u:*}}:log"
        cursor, users, examined = 0, 0, 0
        try:
            if isinstance(self._client, RedisCluster):
                # A cluster's SCAN cursor is one per node: scan_iter walks every master in
                # turn. The budget then bounds the users counted, not the keys examined.
                async for _ in self._client.scan_iter(match=pattern, count=_SCAN_BATCH):
                    users += 1
                    if users >= budget:
                        return UserCount(users=users, complete=False)
                return UserCount(users=users, complete=True)
            while True:
                cursor, keys = await self._client.scan(cursor, match=pattern, count=_SCAN_BATCH)
                users += len(keys)
                examined += _SCAN_BATCH
                if cursor == 0:
                    return UserCount(users=users, complete=True)
                if examined >= budget:
                    return UserCount(users=users, complete=False)
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis count_users failed: {error}") from error

    # -- item table -------------------------------------------------------------------------

    def _item_key(self, shard: int) -> str:
        return f"{self.prefix}:{{i:{shard}}}:items"

    async def put_items(self, items: Mapping[int, Mapping[str, int]]) -> None:
        by_shard: dict[int, dict[Any, Any]] = defaultdict(dict)
        for item_id, attributes in items.items():
            by_shard[item_id % ITEM_SHARDS][str(item_id)] = orjson.dumps(_hash_fields(attributes))
        if not by_shard:
            return
        try:
            async with self._items_client.pipeline(transaction=False) as pipe:
                for shard, fields in by_shard.items():
                    pipe.hset(self._item_key(shard), mapping=fields)
                await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis item write failed: {error}") from error

    async def get_items(self, item_ids: Sequence[int]) -> list[ItemAttributes | None]:
        ids = np.asarray(item_ids, dtype=np.int64)
        found: list[ItemAttributes | None] = [None] * len(ids)
        if not len(ids):
            return found
        # Positions grouped by shard (vectorised: this runs for every candidate set).
        shards = ids % ITEM_SHARDS
        order = np.argsort(shards, kind="stable")
        bounds = np.searchsorted(shards[order], np.arange(ITEM_SHARDS + 1))
        spans = [
            (shard, start, stop)
            for shard, (start, stop) in enumerate(pairwise(bounds.tolist()))
            if start < stop
        ]
        calls: list[tuple[list[str], list[bytes | str | int]]] = [
            ([self._item_key(shard)], [" ".join(map(str, ids[order[start:stop]].tolist()))])
            for shard, start, stop in spans
        ]
        try:
            if isinstance(self._client, RedisCluster):
                # A script's keys must share a slot: one call per shard, pipelined per node.
                return await self._cluster_items(ids, order, spans, calls)
            else:
                # One node: one call for every shard (each pipelined command costs the client
                # tens of microseconds, the most of a small lookup).
                answers = [
                    await self._get_items(
                        keys=[key for keys, _ in calls for key in keys],
                        args=[arg for _, args in calls for arg in args],
                    )
                ]
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis item read failed: {error}") from error
        values = [value for answer in answers for value in answer]  # in the order of `order`
        for position, value in zip(order.tolist(), values, strict=True):
            if value is not None:
                found[position] = _decode_item(value)
        return found

    async def _cluster_items(
        self,
        ids: np.ndarray,
        order: np.ndarray,
        spans: list[tuple[int, int, int]],
        calls: list[tuple[list[str], list[bytes | str | int]]],
    ) -> list[ItemAttributes | None]:
        """The cluster's lookup: one call per shard, each answered or failed on its own, so
        that one node down fails only the ids of its shards (:class:`ItemsUnavailable`); a
        shard whose call failed is not asked again for :data:`ITEM_SHARD_BACKOFF_SECONDS`, so
        requests do not each wait on a node that is down. Raises :class:`StoreError` when no
        shard answers."""
        now = time.monotonic()
        asked = [i for i, (shard, _, _) in enumerate(spans) if self._shard_retry_at[shard] <= now]
        answers = await self._evalsha_pipelined(
            self._get_items, [calls[i] for i in asked], self._items_client, errors_answer=True
        )
        found: list[ItemAttributes | None] = [None] * len(ids)
        unavailable = [True] * len(ids)
        failures: list[BaseException] = []
        for i, answer in zip(asked, answers, strict=True):
            shard, start, stop = spans[i]
            if isinstance(answer, BaseException):
                self._shard_retry_at[shard] = now + ITEM_SHARD_BACKOFF_SECONDS
                failures.append(answer)
                continue
            for position, value in zip(order[start:stop].tolist(), answer, strict=True):
                unavailable[position] = False
                if value is not None:
                    found[position] = _decode_item(value)
        if not any(unavailable):
            return found
        reason = f"{failures[0]}" if failures else "backing off after a failure"
        if all(unavailable):
            raise StoreError(f"redis item read failed: {reason}")
        raise ItemsUnavailable(
            f"redis item read failed on {sum(unavailable)} of {len(ids)} ids: {reason}",
            found,
            unavailable,
        )

    # -- state cache ------------------------------------------------------------------------

    async def put_state(
        self,
        version: str,
        user_id: int,
        blob: bytes,
        cursor: int,
        ttl_seconds: int,
        replace: bool = False,
    ) -> bool:
        try:
            won = await self._put_state(
                keys=[self._key(user_id, f"state:{version}")],
                args=[cursor, blob, ttl_seconds, int(replace)],
            )
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis state write failed: {error}") from error
        return bool(won)

    async def snapshot(self, version: str, user_id: int, ttl_seconds: int) -> UserSnapshot:
        keys = [
            self._key(user_id, f"state:{version}"),
            self._key(user_id, "profile"),
            self._key(user_id, "log"),
            self._key(user_id, "meta"),
        ]
        try:
            blob, profile, length, start = await self._snapshot(keys=keys, args=[ttl_seconds])
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis snapshot failed: {error}") from error
        return UserSnapshot(
            state=bytes(blob) if blob is not None else None,
            profile=_decode_profile(dict(zip(profile[::2], profile[1::2], strict=True))),
            log_length=int(start) + int(length) // RECORD_BYTES,
            log_start=int(start),
        )

    # -- rollout records --------------------------------------------------------------------

    async def record_activity(self, seen: Mapping[int, float], keep: int) -> None:
        """One sorted set ``<prefix>:active`` (user -> latest activity), trimmed to the ``keep``
        most recent: one key, so one slot on a cluster; each worker writes it once per flush
        (about a second), not once per request."""
        if not seen:
            return
        key = f"{self.prefix}:active"
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {str(user_id): float(when) for user_id, when in seen.items()})
                pipe.zremrangebyrank(key, 0, -(keep + 1))
                await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis activity write failed: {error}") from error

    async def active_users(self, count: int) -> list[int]:
        try:
            members: list[Any] = await self._client.zrevrange(f"{self.prefix}:active", 0, count - 1)
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis activity read failed: {error}") from error
        return [int(member) for member in members]

    async def advertise_serving(
        self, worker: str, state_versions: Collection[str], ttl_seconds: float
    ) -> None:
        """HSET the worker's field of ``<prefix>:serving`` to its versions and expiry (unix
        seconds: workers of several replicas compare it), dropping fields long expired."""
        key = f"{self.prefix}:serving"
        now = time.time()
        record = orjson.dumps({"versions": sorted(state_versions), "until": now + ttl_seconds})
        try:
            fields: dict[Any, Any] = await self._client.hgetall(key)
            gone = [f for f, raw in fields.items() if orjson.loads(raw)["until"] < now - 3600]
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(key, worker, record)
                if gone:
                    pipe.hdel(key, *gone)
                await pipe.execute()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis serving record write failed: {error}") from error

    async def served_state_versions(self) -> set[str]:
        try:
            fields: dict[Any, Any] = await self._client.hgetall(f"{self.prefix}:serving")
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis serving record read failed: {error}") from error
        now = time.time()
        records = [orjson.loads(raw) for raw in fields.values()]
        return {str(v) for r in records if r["until"] > now for v in r["versions"]}

    async def delete_states(
        self, keep_versions: Collection[str], batch: int, pause_seconds: float
    ) -> int:
        """SCAN for state keys (on a cluster, every master in turn) and UNLINK those of other
        versions, ``batch`` keys examined per call with a pause between calls, so the scan never
        holds a node for long. A lock key per set of ``keep_versions`` (SET NX, expiring after
        :data:`_CLEANUP_LOCK_SECONDS`) lets the first worker that asks do it and the others skip;
        a rollout back to the same version within that time leaves the states for their TTL."""
        kept = sorted(keep_versions)
        lock = f"{self.prefix}:rollout:cleaned:{','.join(kept)}"
        pattern = f"{_glob_escape(self.prefix)}:{{u:*}}:state:*"
        keep_suffixes = tuple(f":state:{version}".encode() for version in kept)
        deleted = 0
        try:
            if not await self._client.set(lock, "1", nx=True, ex=_CLEANUP_LOCK_SECONDS):
                return 0
            stale: list[bytes] = []
            async for key in self._client.scan_iter(match=pattern, count=batch):
                if not key.endswith(keep_suffixes):
                    stale.append(key)
                if len(stale) >= batch:
                    deleted += await self._unlink(stale)
                    stale = []
                    await asyncio.sleep(pause_seconds)
            deleted += await self._unlink(stale)
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis state cleanup failed: {error}") from error
        return deleted

    async def _unlink(self, keys: Sequence[bytes]) -> int:
        """UNLINK each key (one command per key: on a cluster they lie in many slots)."""
        if not keys:
            return 0
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                # The raw command: the cluster pipeline's unlink() is a coroutine, not a queuing.
                pipe.execute_command("UNLINK", key)
            return sum(int(n) for n in await pipe.execute())

    # -- layout record ----------------------------------------------------------------------

    async def agree_layout(self, actions: Sequence[str], max_history: int) -> StoreLayout:
        key = f"{self.prefix}:layout"
        try:
            for _ in range(_LAYOUT_ATTEMPTS):
                current: Any = await self._client.get(key)  # bytes or None
                recorded = StoreLayout.decode(current) if current is not None else None
                layout = reconcile(recorded, actions, max_history)
                if layout == recorded:
                    return layout
                expected = current if current is not None else b""
                if await self._swap_layout(keys=[key], args=[expected, layout.encode()]):
                    return layout
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis layout record failed: {error}") from error
        raise StoreError(f"the layout record {key} kept changing under {_LAYOUT_ATTEMPTS} tries")

    # -- lifecycle --------------------------------------------------------------------------

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except CLIENT_ERRORS as error:
            raise StoreError(f"redis unreachable: {error}") from error

    async def close(self) -> None:
        if self._items_client is not self._client:
            await self._items_client.aclose()
        await self._client.aclose()

    async def delete_prefix(self) -> int:
        """Delete every key under this store's prefix (tests and benchmarks clean up with it)."""
        deleted = 0
        async for key in self._client.scan_iter(match=f"{self.prefix}:*", count=1000):
            deleted += int(await self._client.delete(key))
        return deleted


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _hash_fields(attributes: Mapping[str, int]) -> dict[Any, Any]:
    """Profile attributes as HSET fields (redis-py's mapping type is invariant in its keys)."""
    return {str(name): int(value) for name, value in attributes.items()}


def _decode_item(value: bytes) -> ItemAttributes | None:
    """Stored attributes, or None (as if absent) for a value this store did not write: one bad
    entry must not fail every request that names the item."""
    try:
        attributes = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(attributes, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in attributes.values()
    ):
        return None
    return attributes


def _decode_profile(raw: dict[Any, Any]) -> dict[str, int]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in (raw or {}).items()
    }
