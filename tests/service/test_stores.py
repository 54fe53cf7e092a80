"""One contract, three stores: every test runs against the in-process store, a real Redis and a
real three-master Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as redis_sync
from redis.asyncio.connection import Connection

from loadtest.harness import redis_process
from service.stores.base import HistoryLimits, NewEvent, SeedHistories, Store, StoreError
from service.stores.idempotency import event_digest
from service.stores.memory import MemoryStore
from service.stores.records import pack_records
from service.stores.redis import ITEM_SHARDS, RedisStore

pytestmark = pytest.mark.anyio
TTL = 3600


REDIS_BACKENDS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=pytest.mark.redis),
]


def open_redis(
    request: pytest.FixtureRequest, backend: str, **options: Any
) -> tuple[RedisStore, str]:
    """A Redis store (single node or cluster) under this test's own prefix, and its URL."""
    if backend == "cluster":
        url = request.getfixturevalue("local_cluster").url
        prefix = request.getfixturevalue("cluster_prefix")
        return RedisStore(url, prefix=prefix, cluster=True, **options), url
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, prefix=request.getfixturevalue("redis_prefix"), **options), url


@pytest.fixture(params=["memory", *REDIS_BACKENDS])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    store, _ = open_redis(request, request.param)
    try:
        yield store
    finally:
        await store.close()


def count_sends(monkeypatch: pytest.MonkeyPatch, command: bytes) -> list[tuple[int, int]]:
    """From now until ``monkeypatch.undo()``, each write to a Redis connection appends (its
    node's port, how many ``command`` commands it carries) to the list returned."""
    sends: list[tuple[int, int]] = []
    real_send = Connection.send_packed_command

    async def counted_send(self: Connection, packed: Any, check_health: bool = True) -> None:
        payload = b"".join(packed) if isinstance(packed, list) else bytes(packed)
        sends.append((int(self.port), payload.count(b"\r\n" + command + b"\r\n")))
        await real_send(self, packed, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted_send)
    return sends


def event(event_id: str, user_id: int, item_id: int, timestamp: float, action: int = 1) -> NewEvent:
    return NewEvent(event_id, user_id, item_id, action, timestamp)


async def test_append_is_idempotent_by_event_id(store: Store) -> None:
    batch = [event("a", 1, 10, 100.0), event("b", 1, 11, 101.0), event("c", 2, 12, 50.0)]
    first = await store.append_events(batch)
    assert (first.accepted, first.duplicates) == (3, 0)
    again = await store.append_events(batch)
    assert (again.accepted, again.duplicates) == (0, 3)
    mixed = await store.append_events([event("a", 1, 99, 1.0), event("d", 1, 13, 102.0)])
    assert (mixed.accepted, mixed.duplicates) == (1, 1)
    log = await store.read_events(1, 0)
    assert log.item_ids.tolist() == [10, 11, 13]  # the duplicate "a" did not replace anything
    assert log.end == 3


async def test_an_id_repeated_inside_one_batch_counts_once(store: Store) -> None:
    result = await store.append_events([event("x", 5, 1, 1.0), event("x", 5, 2, 2.0)])
    assert (result.accepted, result.duplicates) == (1, 1)
    assert (await store.read_events(5, 0)).item_ids.tolist() == [1]


async def test_reads_after_a_cursor_come_in_timestamp_order(store: Store) -> None:
    await store.append_events([event("1", 7, 1, 30.0), event("2", 7, 2, 10.0)])
    await store.append_events([event("3", 7, 3, 20.0, action=3), event("4", 7, 4, 5.0)])
    everything = await store.read_events(7, 0)
    assert everything.item_ids.tolist() == [4, 2, 3, 1]
    assert everything.timestamps.tolist() == [5.0, 10.0, 20.0, 30.0]
    assert everything.actions.tolist() == [1, 1, 3, 1]
    assert everything.end == 4
    # Positions are arrival order: an old timestamp that arrives late is still "after" a cursor.
    newer = await store.read_events(7, 2)
    assert newer.item_ids.tolist() == [4, 3]
    assert newer.end == 4
    assert len(await store.read_events(7, 4)) == 0
    assert len(await store.read_events(404, 0)) == 0


async def test_snapshot_reports_log_length_profile_and_state(store: Store) -> None:
    empty = await store.snapshot("v1", 8, TTL)
    assert (empty.state, empty.profile, empty.log_length) == (None, {}, 0)
    await store.append_events([event("a", 8, 1, 1.0), event("b", 8, 2, 2.0)])
    await store.put_profile(8, {"age_group": 3, "region": 17})
    await store.put_state("v1", 8, b"state-at-2", 2, TTL)
    snapshot = await store.snapshot("v1", 8, TTL)
    assert snapshot.state == b"state-at-2"
    assert snapshot.profile == {"age_group": 3, "region": 17}
    assert snapshot.log_length == 2


async def test_put_state_is_a_compare_and_set_on_the_cursor(store: Store) -> None:
    assert await store.put_state("v1", 9, b"at-5", 5, TTL)
    assert not await store.put_state("v1", 9, b"older", 3, TTL)
    assert not await store.put_state("v1", 9, b"same", 5, TTL)
    assert (await store.snapshot("v1", 9, TTL)).state == b"at-5"
    assert await store.put_state("v1", 9, b"at-8", 8, TTL)
    assert (await store.snapshot("v1", 9, TTL)).state == b"at-8"


async def test_racing_writers_leave_the_newest_cursor(store: Store) -> None:
    cursors = list(range(1, 41))
    np.random.default_rng(0).shuffle(cursors)
    await asyncio.gather(*(store.put_state("v1", 10, f"c{c}".encode(), c, TTL) for c in cursors))
    assert (await store.snapshot("v1", 10, TTL)).state == b"c40"


async def test_states_are_namespaced_by_model_version_and_user(store: Store) -> None:
    await store.put_state("v1", 11, b"v1-state", 1, TTL)
    assert (await store.snapshot("v2", 11, TTL)).state is None
    assert (await store.snapshot("v1", 12, TTL)).state is None
    assert await store.put_state("v2", 11, b"v2-state", 1, TTL)
    assert (await store.snapshot("v1", 11, TTL)).state == b"v1-state"


@pytest.mark.slow
async def test_states_expire_after_their_ttl(store: Store) -> None:
    await store.put_state("v1", 13, b"short-lived", 1, 1)
    assert (await store.snapshot("v1", 13, 1)).state == b"short-lived"
    await asyncio.sleep(2.1)
    assert (await store.snapshot("v1", 13, 1)).state is None
    # An expired entry no longer blocks an older cursor.
    assert await store.put_state("v1", 13, b"again", 1, TTL)


async def test_seed_writes_users_without_a_log_and_keeps_the_others(store: Store) -> None:
    await store.append_events([event("live", 21, 99, 1.0)])
    records = pack_records(
        np.array([1, 2, 3, 4, 5]), np.array([0, 1, 0, 2, 3]), np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    )
    histories = SeedHistories(
        user_ids=np.array([20, 21, 22]),
        bounds=np.array([0, 2, 3, 5]),
        records=records,
        profiles={20: {"gender": 1}, 23: {"gender": 2}},
    )
    assert await store.seed(histories) == 2
    assert (await store.read_events(20, 0)).item_ids.tolist() == [1, 2]
    assert (await store.read_events(21, 0)).item_ids.tolist() == [99]
    seeded = await store.read_events(22, 0)
    assert seeded.item_ids.tolist() == [4, 5]
    assert seeded.actions.tolist() == [2, 3]
    assert (await store.snapshot("v", 23, TTL)).profile == {"gender": 2}
    assert await store.seed(histories) == 0  # a second start changes nothing


async def test_ping(store: Store) -> None:
    await store.ping()


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_redis_keys_share_the_users_hash_tag(
    request: pytest.FixtureRequest, backend: str
) -> None:
    store, url = open_redis(request, backend)
    try:
        await store.append_events([event("a", 77, 1, 1.0)])
        await store.put_profile(77, {"gender": 1})
        await store.put_state("v9", 77, b"s", 1, TTL)
    finally:
        await store.close()
    cluster = backend == "cluster"
    client = (redis_sync.RedisCluster if cluster else redis_sync.Redis).from_url(url)
    prefix = store.prefix
    keys = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:*"))
    parts = ("eids", "log", "meta", "profile", "state:v9")
    assert keys == [f"{prefix}:{{u:77}}:{part}" for part in parts]
    assert 0 < client.ttl(f"{prefix}:{{u:77}}:state:v9") <= TTL
    if isinstance(client, redis_sync.RedisCluster):
        # One slot: one master holds them all, and a script may touch them together.
        assert len({client.keyslot(key) for key in keys}) == 1
    client.close()


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "cluster"])
async def test_an_unreachable_redis_raises_store_errors(cluster: bool) -> None:
    from service.stores.base import StoreError

    store = RedisStore("redis://127.0.0.1:1/0", timeout_seconds=0.2, cluster=cluster)
    try:
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.snapshot("v", 1, TTL)
    finally:
        await store.close()


def limited(store: Store, max_history: int, dedup_window: int, dedup_seconds: int = 3600) -> Store:
    """The same backend with other :class:`HistoryLimits` (every store keeps them as ``limits``)."""
    store.limits = HistoryLimits(  # type: ignore[attr-defined]
        max_history=max_history, dedup_window=dedup_window, dedup_seconds=dedup_seconds
    )
    return store


async def test_a_long_log_is_cut_and_positions_stay_absolute(store: Store) -> None:
    store = limited(store, max_history=4, dedup_window=100)
    for i in range(11):
        await store.append_events([event(f"e{i}", 30, 100 + i, 1000.0 + i)])
    snapshot = await store.snapshot("v", 30, TTL)
    # The last 4 + 1 records are kept: positions 6..10 (in Redis a ring whose oldest record,
    # position 6, sits in its last slot, so whole reads wrap).
    assert HistoryLimits(max_history=4).keep == 5
    assert (snapshot.log_start, snapshot.log_length) == (6, 11)
    log = await store.read_events(30, 0)
    assert log.positions.tolist() == list(range(6, 11))
    assert log.item_ids.tolist() == list(range(106, 111))
    assert (await store.read_events(30, 9)).item_ids.tolist() == [109, 110]
    window = await store.read_events(30, 6, 8)
    assert (window.positions.tolist(), window.end) == ([6, 7], 11)
    # A batch that laps the ring keeps the last 5 of it, in order.
    await store.append_events([event(f"f{i}", 30, 200 + i, 2000.0 + i) for i in range(9)])
    log = await store.read_events(30, 0)
    assert (log.positions.tolist(), log.end) == (list(range(15, 20)), 20)
    assert log.item_ids.tolist() == list(range(204, 209))


async def test_event_ids_are_remembered_over_the_dedup_window_only(store: Store) -> None:
    store = limited(store, max_history=100, dedup_window=3)
    for i in range(5):
        await store.append_events([event(f"e{i}", 31, i, 10.0 + i)])
    # e2..e4 are the last three: retries of them are duplicates, e2 just inside the window.
    result = await store.append_events([event("e4", 31, 4, 14.0), event("e2", 31, 2, 12.0)])
    assert (result.accepted, result.duplicates) == (0, 2)
    # e1, just outside, is appended again (the documented limit of idempotency); it is now one
    # of the last three, and e2 fell out.
    assert (await store.append_events([event("e1", 31, 1, 11.0)])).accepted == 1
    result = await store.append_events([event("e1", 31, 1, 11.0), event("e2", 31, 2, 12.0)])
    assert (result.accepted, result.duplicates) == (1, 1)


async def test_a_batch_longer_than_the_window_remembers_its_last_events(store: Store) -> None:
    store = limited(store, max_history=100, dedup_window=3)
    batch = [event(f"b{i}", 35, i, 10.0 + i) for i in range(5)]
    # Inside one batch, a repeated id is a duplicate however the window laps.
    assert (await store.append_events([*batch, batch[4]])).accepted == 5
    # Re-posted whole, each event is checked against the window as it stands then: b0 and b1
    # fell out; appending them pushes b2 and then b3 out, and so on: all five are new again.
    assert (await store.append_events(batch)).accepted == 5
    assert (await store.read_events(35, 0)).end == 10
    # The window is the second batch's last three (checked before b1 pushes b2 out).
    result = await store.append_events(batch[4:0:-1])
    assert (result.accepted, result.duplicates) == (1, 3)


@pytest.fixture(params=["memory", *REDIS_BACKENDS])
async def clocked(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, list[float]]]:
    """A store whose digests are stamped by a clock the test sets (``now[0]``, unix seconds)."""
    now = [1_700_000_000.0]

    def clock() -> float:
        return now[0]

    if request.param == "memory":
        yield MemoryStore(clock=clock), now
        return
    store, _ = open_redis(request, request.param, clock=clock)
    try:
        yield store, now
    finally:
        await store.close()


async def test_event_ids_are_remembered_for_dedup_seconds_only(
    clocked: tuple[Store, list[float]],
) -> None:
    store, now = clocked
    store = limited(store, max_history=100, dedup_window=100, dedup_seconds=60)
    await store.append_events([event("early", 36, 1, 1.0)])
    now[0] += 30
    await store.append_events([event("late", 36, 2, 2.0)])
    now[0] += 29  # 59 s after "early", 29 s after "late": both just inside
    result = await store.append_events([event("early", 36, 1, 1.0), event("late", 36, 2, 2.0)])
    assert (result.accepted, result.duplicates) == (0, 2)
    now[0] += 1  # 60 s after "early": just outside, appended again; "late" still inside
    result = await store.append_events([event("early", 36, 1, 1.0), event("late", 36, 2, 2.0)])
    assert (result.accepted, result.duplicates) == (1, 1)
    assert await store.event_digests(36, 0, 3) == {
        1: event_digest("late").hex(),
        2: event_digest("early").hex(),
    }


async def test_replace_writes_over_a_larger_cursor(store: Store) -> None:
    await store.put_state("v1", 32, b"wrong", 99, TTL)
    assert not await store.put_state("v1", 32, b"right", 3, TTL)
    assert await store.put_state("v1", 32, b"right", 3, TTL, replace=True)
    assert (await store.snapshot("v1", 32, TTL)).state == b"right"


@pytest.mark.redis
async def test_a_read_refreshes_the_ttl_only_when_less_than_half_is_left(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    client = redis_sync.Redis.from_url(redis_url)
    key = f"{redis_prefix}:{{u:33}}:state:v1"
    try:
        await store.put_state("v1", 33, b"s", 1, 100)
        await store.snapshot("v1", 33, 150)  # 100 s left of 150: more than half, no write
        assert 95 <= client.ttl(key) <= 100
        await store.snapshot("v1", 33, 1000)  # 100 s left of 1000: refreshed
        assert client.ttl(key) > 900
    finally:
        await store.close()
        client.close()


async def test_the_memory_store_refreshes_the_ttl_only_when_less_than_half_is_left() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    await store.put_state("v1", 34, b"s", 1, 100)
    now[0] = 40.0
    await store.snapshot("v1", 34, 100)  # 60 s left of 100: kept as it is
    now[0] = 101.0
    assert (await store.snapshot("v1", 34, 100)).state is None
    await store.put_state("v1", 34, b"s", 1, 100)
    now[0] = 160.0
    await store.snapshot("v1", 34, 100)  # 41 s left: refreshed to 100 from now
    now[0] = 250.0
    assert (await store.snapshot("v1", 34, 100)).state == b"s"


@pytest.mark.redis
async def test_a_password_in_the_redis_url_authenticates(tmp_path: Path) -> None:
    with redis_process(tmp_path, password="s3cret") as server:
        store = RedisStore(server.url, prefix="auth")
        anonymous = RedisStore(server.url.replace(":s3cret@", ""), prefix="auth", retries=0)
        try:
            assert (await store.append_events([event("a", 1, 2, 3.0)])).accepted == 1
            with pytest.raises(StoreError):
                await anonymous.snapshot("v", 1, TTL)
        finally:
            await store.close()
            await anonymous.close()


@pytest.mark.redis
async def test_a_rediss_url_talks_tls(tmp_path: Path) -> None:
    with redis_process(tmp_path, password="s3cret", tls=True) as server:
        assert server.url.startswith("rediss://:s3cret@")
        store = RedisStore(server.url, prefix="tls")
        plain = RedisStore(f"redis://:s3cret@127.0.0.1:{server.port}/0", prefix="tls", retries=0)
        try:
            assert (await store.append_events([event("a", 1, 2, 3.0)])).accepted == 1
            assert (await store.snapshot("v", 1, TTL)).log_length == 1
            with pytest.raises(StoreError):
                await plain.snapshot("v", 1, TTL)
        finally:
            await store.close()
            await plain.close()


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_a_batch_is_one_script_call_per_user_in_one_round_trip_per_node(
    request: pytest.FixtureRequest, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/events batches reach Redis pipelined: one EVALSHA per user (one slot), every call to a
    node written in one send, so a batch costs a round trip per node, not one per event."""
    store, _ = open_redis(request, backend)
    users = range(300, 330)

    def batch(tag: str) -> list[NewEvent]:
        return [event(f"{tag}-{u}-{i}", u, i, float(i)) for u in users for i in range(10)]

    try:
        await store.append_events(batch("warm"))  # connects, learns the topology, loads scripts
        sends = count_sends(monkeypatch, b"EVALSHA")
        result = await store.append_events(batch("counted"))
        monkeypatch.undo()
        assert (result.accepted, result.duplicates) == (300, 0)
    finally:
        await store.close()
    assert sum(calls for _, calls in sends) == len(users)
    ports = [port for port, _ in sends]
    assert len(ports) == len(set(ports))  # one send per node
    assert len(ports) == (3 if backend == "cluster" else 1)  # 30 users span every master


async def test_the_item_table_upserts_whole_items_and_looks_them_up_in_bulk(store: Store) -> None:
    big = 2**63 - 1
    assert await store.get_items([1, big]) == [None, None]
    assert await store.get_items([]) == []
    await store.put_items({1: {"category": 3, "author": 7}, 2: {"category": 1}, big: {"author": 0}})
    await store.put_items({1: {"author": 9}})  # replaces item 1's attributes as a whole
    spread = list(range(100, 164))  # every shard of the table
    await store.put_items({i: {"category": i % 8, "author": -i} for i in spread})
    found = await store.get_items([2, 5, 1, big, *spread, 10**12])
    assert found[:4] == [{"category": 1}, None, {"author": 9}, {"author": 0}]
    assert found[4:-1] == [{"category": i % 8, "author": -i} for i in spread]
    assert found[-1] is None


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_an_item_lookup_is_one_round_trip_per_node(
    request: pytest.FixtureRequest, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A candidate set's item lookup is one script call on a single node, and on a cluster one
    per shard of the item table, every call to a node written in one send: 1000 ids cost a
    round trip per node."""
    store, _ = open_redis(request, backend)
    ids = list(range(5000, 6000))
    try:
        await store.put_items({i: {"category": 1} for i in ids[::2]})  # connects, learns nodes
        sends = count_sends(monkeypatch, b"EVALSHA")
        found = await store.get_items(ids)
        monkeypatch.undo()
    finally:
        await store.close()
    assert found == [{"category": 1} if i % 2 == 0 else None for i in ids]
    assert sum(calls for _, calls in sends) == (ITEM_SHARDS if backend == "cluster" else 1)
    ports = [port for port, _ in sends]
    assert len(ports) == len(set(ports))  # one send per node
    assert len(ports) == (3 if backend == "cluster" else 1)  # the shards span every master


def _attribute_error_raised_in(filename: str) -> AttributeError:
    try:
        eval(compile("None.writelines", filename, "eval"))
    except AttributeError as error:
        return error
    raise AssertionError("expected an AttributeError")


def test_a_torn_connection_inside_the_client_is_a_store_error_and_ours_stays_a_bug() -> None:
    from service.metrics import Metrics
    from service.stores.instrumented import InstrumentedStore

    class Failing(MemoryStore):
        error: BaseException

        async def append_events(self, events):
            raise self.error

    inner = Failing()
    store = InstrumentedStore(inner, Metrics())
    inner.error = _attribute_error_raised_in("/venv/lib/redis/asyncio/connection.py")
    with pytest.raises(StoreError, match="torn down"):
        asyncio.run(store.append_events([]))
    inner.error = _attribute_error_raised_in("/work/service/stores/redis.py")
    with pytest.raises(AttributeError):
        asyncio.run(store.append_events([]))


USER_PARTS = ("log", "eids", "meta", "profile")
"""A user's keys that expire with the retention (states have their own TTL)."""


def wait_until_gone(client: redis_sync.Redis | redis_sync.RedisCluster, keys: list[str]) -> None:
    """Until Redis has expired every key (its expiry is to the millisecond; the poll only waits
    for it, the test asserts nothing about when)."""
    for _ in range(200):
        if not any(client.exists(key) for key in keys):
            return
        time.sleep(0.05)
    raise AssertionError(f"keys still there: {keys}")


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_only_appends_refresh_the_retention_of_a_users_keys(
    request: pytest.FixtureRequest, backend: str
) -> None:
    store, url = open_redis(request, backend)
    store.limits = HistoryLimits(retention_seconds=1000)
    client = (redis_sync.RedisCluster if backend == "cluster" else redis_sync.Redis).from_url(url)
    keys = [f"{store.prefix}:{{u:37}}:{part}" for part in USER_PARTS]
    try:
        await store.put_profile(37, {"gender": 1})
        await store.append_events([event("a", 37, 1, 1.0)])
        assert all(990 < client.ttl(key) <= 1000 for key in keys)
        for key in keys:
            client.expire(key, 100)
        await store.snapshot("v", 37, TTL)
        await store.read_events(37, 0)
        await store.event_digests(37, 0, 1)
        assert all(0 < client.ttl(key) <= 100 for key in keys)  # reads wrote nothing
        await store.append_events([event("a", 37, 1, 1.0)])  # a duplicate: the profile only
        assert all(0 < client.ttl(key) <= 100 for key in keys[:3])
        await store.append_events([event("b", 37, 2, 2.0)])
        assert all(990 < client.ttl(key) <= 1000 for key in keys)
    finally:
        await store.close()
        client.close()


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_a_user_who_returns_after_the_retention_starts_from_an_empty_log(
    request: pytest.FixtureRequest, backend: str
) -> None:
    store, url = open_redis(request, backend)
    store.limits = HistoryLimits(max_history=2, retention_seconds=1)
    client = (redis_sync.RedisCluster if backend == "cluster" else redis_sync.Redis).from_url(url)
    try:
        await store.put_profile(38, {"gender": 1})
        await store.append_events([event(f"e{i}", 38, i, float(i)) for i in range(5)])
        assert (await store.snapshot("v", 38, TTL)).log_start == 2  # a ring by now
        wait_until_gone(client, [f"{store.prefix}:{{u:38}}:{part}" for part in USER_PARTS])
        snapshot = await store.snapshot("v", 38, TTL)
        assert (snapshot.log_start, snapshot.log_length, snapshot.profile) == (0, 0, {})
        # Its old ids are forgotten with the log: a re-post is a new event at position 0.
        assert (await store.append_events([event("e4", 38, 40, 50.0)])).accepted == 1
        log = await store.read_events(38, 0)
        assert (log.positions.tolist(), log.item_ids.tolist(), log.end) == ([0], [40], 1)
    finally:
        await store.close()
        client.close()


async def test_the_memory_store_forgets_a_user_after_the_retention() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0], limits=HistoryLimits(retention_seconds=100))
    await store.put_profile(39, {"gender": 1})
    await store.append_events([event("a", 39, 1, 1.0)])
    now[0] = 99.0
    await store.snapshot("v", 39, TTL)  # a read does not extend the retention
    await store.append_events([event("b", 39, 2, 2.0)])  # an append does
    now[0] = 198.0
    assert (await store.snapshot("v", 39, TTL)).log_length == 2
    now[0] = 199.0
    snapshot = await store.snapshot("v", 39, TTL)
    assert (snapshot.log_length, snapshot.profile) == (0, {})
    assert (await store.append_events([event("a", 39, 1, 1.0)])).accepted == 1


@pytest.mark.redis
async def test_a_full_log_takes_its_records_bytes_and_no_more(
    redis_url: str, redis_prefix: str
) -> None:
    """APPEND doubles a string's allocation when it grows; the full log is a ring of exactly
    ``keep`` records that never grows again, however many events follow."""
    store = RedisStore(redis_url, prefix=redis_prefix, limits=HistoryLimits(max_history=200))
    client = redis_sync.Redis.from_url(redis_url)
    key = f"{redis_prefix}:{{u:40}}:log"
    try:
        keep = store.limits.keep
        sizes: list[int] = []
        for i in range(0, 3 * keep, 3):
            await store.append_events([event(f"e{j}", 40, j, float(j)) for j in range(i, i + 3)])
            if i >= keep:
                sizes.append(int(client.memory_usage(key) or 0))
        assert client.strlen(key) == keep * 20
        # The allocator rounds 6000 bytes up to its next size class (at most 1/8 more), and the
        # key and object headers take under 100 bytes.
        assert max(sizes) == min(sizes) <= keep * 20 * 9 / 8 + 100
        assert (await store.read_events(40, 0)).item_ids.tolist() == list(
            range(3 * keep - keep, 3 * keep)
        )
    finally:
        await store.close()
        client.close()
