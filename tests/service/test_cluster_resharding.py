"""A user's slot moves to another master while the store is in use (resharding).

The migration is done by hand, as ``redis-cli --cluster reshard`` does it: the slot is marked
MIGRATING on its master and IMPORTING on the new one, keys are moved with MIGRATE, then the slot
is assigned to the new master. Meanwhile, a user whose keys are still on the old master is
served there (scripts included), a new user of the same slot is written through an ASK
redirection (ASKING and the command on one connection, with several idle ones in the pool), and
once the slot has moved the same store, whose slot map is now stale, follows MOVED with every
byte of both users intact. (A script over several keys of a slot that is half moved answers
TRYAGAIN until the move completes: Redis's rule, surfaced as a retryable store error.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from loadtest.harness import LocalCluster, redis_cluster
from service.stores.base import NewEvent
from service.stores.redis import RedisStore

pytestmark = [pytest.mark.anyio, pytest.mark.redis]
PREFIX = "ifa-reshard"
TTL = 3600


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own: the test reassigns a slot."""
    with redis_cluster(tmp_path / "cluster") as started:
        yield started


def slot_of(user_id: int) -> int:
    return int(key_slot(f"{PREFIX}:{{u:{user_id}}}:log".encode()))


def node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port)


def owners(cluster: LocalCluster) -> list[int]:
    """Port of the master serving each of the 16384 slots, as the first node sees it."""
    served = [0] * 16384
    with node(cluster.nodes[0].port) as client:
        for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
            served[start : end + 1] = [int(master[1])] * (end - start + 1)
    return served


def events(user_id: int, tag: str, n: int) -> list[NewEvent]:
    return [NewEvent(f"{tag}-{i}", user_id, 10 + i, 1, 100.0 + i) for i in range(n)]


async def test_a_slot_moved_mid_use_is_followed_through_ask_and_moved(
    cluster: LocalCluster,
) -> None:
    settled, newcomer = 42, next(u for u in range(43, 10**6) if slot_of(u) == slot_of(42))
    slot = slot_of(settled)
    served = owners(cluster)
    source = served[slot]
    target = next(n.port for n in cluster.nodes if n.port != source)
    ids = {}
    for port in (source, target):
        with node(port) as client:
            ids[port] = client.execute_command("CLUSTER MYID").decode()

    store = RedisStore(cluster.url, prefix=PREFIX, cluster=True)
    try:
        assert (await store.append_events(events(settled, "a", 3))).accepted == 3
        assert await store.put_state("v1", settled, b"state-at-3", 3, TTL)
        await store.put_profile(settled, {"gender": 2})

        # The slot starts to move: nothing has been copied yet.
        with node(target) as client:
            client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        with node(source) as client:
            client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])

        # Keys still on the source are served there, scripts included.
        result = await store.append_events(events(settled, "b", 2) + events(settled, "a", 1))
        assert (result.accepted, result.duplicates) == (2, 1)
        assert (await store.snapshot("v1", settled, TTL)).log_length == 5
        # A key that does not exist yet is created on the target (ASK), while the target's pool
        # holds several idle connections (so ASKING must share the command's).
        on_target = [u for u in range(2000) if served[slot_of(u)] == target][:16]
        await asyncio.gather(*(store.put_profile(u, {"gender": 1}) for u in on_target))
        await store.put_profile(newcomer, {"gender": 0})
        with node(target) as client:
            client.execute_command("ASKING")
            assert client.hgetall(f"{PREFIX}:{{u:{newcomer}}}:profile") == {b"gender": b"0"}

        # Move the settled user's keys in one MIGRATE and hand the slot over everywhere.
        with node(source) as client:
            keys = client.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
            assert len(keys) == 5  # log, eids, meta, profile, state of the settled user (the
            # newcomer's profile is on the target already)
            client.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for n in cluster.nodes:
            with node(n.port) as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        cluster.wait_healthy()

        # The store's slot map still names the source: MOVED, followed, nothing lost.
        snapshot = await store.snapshot("v1", settled, TTL)
        assert (snapshot.state, snapshot.profile, snapshot.log_length) == (
            b"state-at-3", {"gender": 2}, 5,
        )  # fmt: skip
        assert (await store.read_events(settled, 0)).item_ids.tolist() == [10, 10, 11, 11, 12]
        assert not await store.put_state("v1", settled, b"older", 2, TTL)
        assert await store.put_state("v1", settled, b"state-at-5", 5, TTL)
        again = await store.append_events(events(settled, "b", 2) + events(newcomer, "n", 4))
        assert (again.accepted, again.duplicates) == (4, 2)
        newcomer_now = await store.snapshot("v1", newcomer, TTL)
        assert (newcomer_now.profile, newcomer_now.log_length) == ({"gender": 0}, 4)
        assert owners(cluster)[slot] == target
    finally:
        await store.close()
