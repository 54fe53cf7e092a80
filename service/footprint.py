"""``python -m service.bench --parts footprint,soak``: what a user costs in Redis, and whether it
stays that under load.

footprint
    For each source tree (this one, and with ``--baseline REV`` that revision's) and each topology
    (a single node, a three-master cluster), a fresh Redis and ``python -m service`` of that
    tree on its defaults: users are posted 30, 300, 1,500 and 6,000 events (10 per /events, as
    the load tests post them; 1, 10, 50 and 200 events a day over the 30-day retention) and
    ranked once, then each of their keys is measured with ``MEMORY USAGE``. Reported: bytes per
    user at the history cap (6,000 events) per key and in total, users per GiB, Redis's own
    ``used_memory`` growth per byte measured (dictionary entries, expiry records), the server
    time of an append, and the packed digests beside an integer-encoded set of the same digests.

soak
    This tree's service on a fresh Redis, users filled past the cap first (log ring and digest
    window full, a state cached), then ``--soak-seconds`` of open-loop load at ``--soak-rate``
    (the load tests' 4:1 mix of /rank and /events), Redis's ``used_memory`` and the
    ``MEMORY USAGE`` of a sample of users taken every few seconds: flat once every user is at its
    cap.

Both write into results/footprint.{json,md} (a part run alone keeps the other's last results).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import redis

from loadtest.harness import REPO_ROOT, redis_cluster, redis_server, running_service
from loadtest.openloop import PreparedRequest, poisson_schedule, prepare_post, run_open_loop
from loadtest.traffic import Traffic, TrafficConfig
from service.stores.base import HistoryLimits, NewEvent
from service.stores.redis import RedisStore

GIB = 1 << 30
KIB_TARGET = 48
"""Bytes per user at the cap that fit 10⁸ users in a few TiB: ≤ 48 KiB on the defaults."""
LEVELS = {30: 2, 300: 2, 1500: 2, 5990: 2, 6000: 4}
"""Events posted per user -> users posted that many (6,000: the cap, measured most; 5,990: just
before a cut of the baseline's log, which is cut back to 1,500 records every 500 events)."""
CAP_EVENTS = max(LEVELS)
EVENTS_PER_POST = 10
RETENTION_DAYS = 30
SIZING_USERS = (10**6, 10**7, 10**8)
SIZING_EVENTS = (30, 300, 1500, 6000)
"""Events a user posted over the retention at 1, 10, 50 and 200 a day."""
ACTIONS = ("impression", "click", "long_view", "like")
PREFIX = "ifa-footprint"
SOAK_USERS = 300
SOAK_FILL = 1600
"""Events appended per soak user before the load: past the log's keep (1,250 at max_history
1,000) and the digest window (512)."""
SOAK_SAMPLE_USERS = 20
SOAK_SAMPLE_SECONDS = 10.0
SOAK_CANDIDATES = 200


# -- footprint ------------------------------------------------------------------------------


def key_part(key: bytes) -> str:
    """``log``, ``eids``, ``meta``, ``profile`` or ``state`` (whatever the version) of a key."""
    part = key.decode().split("}:", 1)[1]
    return "state" if part.startswith("state:") else part


def user_events(user: int, count: int, rng: np.random.Generator) -> list[list[dict[str, Any]]]:
    """``count`` events of ``user`` as /events bodies of :data:`EVENTS_PER_POST`."""
    now = time.time() - count
    events = [
        {
            "event_id": f"fp-{user}-{i}",
            "user_id": user,
            "item_id": int(rng.integers(0, 100_000)),
            "action": ACTIONS[int(rng.integers(0, 4))],
            "timestamp": now + i,
        }
        for i in range(count)
    ]
    return [events[i : i + EVENTS_PER_POST] for i in range(0, count, EVENTS_PER_POST)]


def post_users(client: httpx.Client) -> dict[int, int]:
    """Post every user's events; user -> events posted."""
    rng = np.random.default_rng(11)
    users: dict[int, int] = {}
    for events, count in LEVELS.items():
        for _ in range(count):
            user = 1000 + len(users)
            for batch in user_events(user, events, rng):
                client.post("/events", json={"events": batch}).raise_for_status()
            users[user] = events
    return users


def rank_users(client: httpx.Client, users: list[int]) -> None:
    """A /rank per user: each gets a cached state."""
    for user in users:
        rank = {"user_id": user, "candidate_ids": list(range(100))}
        client.post("/rank", json=rank).raise_for_status()


def masters(client: redis.Redis | redis.RedisCluster) -> list[redis.Redis]:
    """A client of each master (of the one node, on a single node); close them after use."""
    if isinstance(client, redis.RedisCluster):
        return [redis.Redis(host=n.host, port=n.port) for n in client.get_primaries()]
    return [redis.Redis(connection_pool=client.connection_pool)]


def server_stats(client: redis.Redis | redis.RedisCluster) -> tuple[int, float]:
    """(used_memory summed over the masters, EVALSHA µs per call since the last reset)."""
    used, calls, usec = 0, 0, 0
    for node in masters(client):
        memory: Any = node.info("memory")
        evalsha: Any = node.info("commandstats").get("cmdstat_evalsha", {})
        used += int(memory["used_memory"])
        calls += int(evalsha.get("calls", 0))
        usec += int(evalsha.get("usec", 0))
        if isinstance(client, redis.RedisCluster):
            node.close()
    return used, usec / max(calls, 1)


def reset_stats(client: redis.Redis | redis.RedisCluster) -> None:
    for node in masters(client):
        node.config_resetstat()
        if isinstance(client, redis.RedisCluster):
            node.close()


def measure_keys(client: redis.Redis | redis.RedisCluster, user: int) -> dict[str, int]:
    """MEMORY USAGE (all samples) of each key of ``user``, by part."""
    sizes: dict[str, int] = {}
    for key in client.scan_iter(match=f"{PREFIX}:{{u:{user}}}:*", count=1000):
        usage: Any = client.memory_usage(key, samples=0)
        sizes[key_part(key)] = int(usage)
    return sizes


COPIES = 500
"""Copies of a user at the cap restored to measure what Redis really spends per user."""


def marginal_bytes(client: redis.Redis | redis.RedisCluster, user: int) -> dict[str, float]:
    """Redis's used_memory growth per copy of ``user``'s keys (DUMP, then RESTORE under
    :data:`COPIES` other user ids with the same TTLs), against MEMORY USAGE of one copy: what
    the per-key figures leave out (the expiry table's entries, the hash tables' buckets)."""
    keys = list(client.scan_iter(match=f"{PREFIX}:{{u:{user}}}:*", count=1000))
    dumps: dict[bytes, tuple[Any, int]] = {
        key: (client.dump(key), max(int(client.pttl(key)), 0)) for key in keys
    }
    before, _ = server_stats(client)
    for copy in range(COPIES):
        pipe = client.pipeline(transaction=False)
        for key, (dumped, ttl) in dumps.items():
            pipe.restore(copy_key(key, user, 900_000 + copy), ttl, dumped)
        pipe.execute()
    after, _ = server_stats(client)
    one_copy = sum(measure_keys(client, 900_000).values())
    return {
        "used_memory_per_user": (after - before) / COPIES,
        "memory_usage_per_user": one_copy,
        "ratio": (after - before) / COPIES / one_copy,
    }


def copy_key(key: bytes, user: int, copy: int) -> str:
    return key.decode().replace(f"{{u:{user}}}", f"{{u:{copy}}}", 1)


def measure_tree(model_dir: Path, root: Path, url: str, cluster: bool, log: Path) -> dict[str, Any]:
    """One tree's service on one (empty) Redis: bytes per key of users at each level."""
    client: redis.Redis | redis.RedisCluster = (
        redis.RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    )
    env = {"IFA_STORE": "redis", "IFA_REDIS_URL": url, "IFA_REDIS_PREFIX": PREFIX,
           "IFA_REDIS_CLUSTER": "true" if cluster else "false"}  # fmt: skip
    try:
        with running_service(model_dir, log, env, args=["--log-level", "warning"], root=root) as s:
            info = httpx.get(f"{s.url}/model", timeout=30).json()
            before, _ = server_stats(client)
            reset_stats(client)
            started = time.perf_counter()
            with httpx.Client(base_url=s.url, timeout=30) as http:
                users = post_users(http)
                # Only the append script ran so far: its server time per call.
                _, evalsha_usec = server_stats(client)
                rank_users(http, list(users))
            seconds = time.perf_counter() - started
            after, _ = server_stats(client)
        by_level: dict[int, list[dict[str, int]]] = defaultdict(list)
        for user, events in users.items():
            by_level[events].append(measure_keys(client, user))
        marginal = marginal_bytes(client, max(u for u, e in users.items() if e == CAP_EVENTS))
    finally:
        client.close()
    levels = {}
    for events, measured in sorted(by_level.items()):
        parts = sorted({part for sizes in measured for part in sizes})
        mean = {part: statistics.fmean(s.get(part, 0) for s in measured) for part in parts}
        levels[str(events)] = {"keys": mean, "total": sum(mean.values())}
    return {
        "max_history": info["limits"]["max_history"],
        "dedup_window": info["limits"]["dedup_window"],
        "levels": levels,
        "used_memory_growth": after - before,
        "copies": marginal,
        "evalsha_usec_per_call": evalsha_usec,
        "fill_seconds": seconds,
    }


def integer_set_bytes(url: str, window: int) -> dict[str, int]:
    """MEMORY USAGE of ``window`` random 64-bit digests as a Redis set of integers, at the
    intset's default entry limit (512) and one past it (the set turns into a hash table)."""
    client = redis.Redis.from_url(url)
    rng = np.random.default_rng(0)
    try:
        sizes = {}
        for count in (window, 513):
            key = f"{PREFIX}:intset:{count}"
            client.sadd(key, *(int(v) for v in rng.integers(-(2**63), 2**63 - 1, count)))
            usage: Any = client.memory_usage(key, samples=0)
            sizes[str(count)] = int(usage)
            client.delete(key)
        return sizes
    finally:
        client.close()


@contextmanager
def topology(name: str, directory: Path) -> Iterator[str]:
    """A fresh, empty Redis of that topology; yields a URL that reaches it."""
    if name == "cluster":
        with redis_cluster(directory) as cluster:
            yield cluster.url
    else:
        with redis_server(directory) as url:
            yield url


def footprint(model_dir: Path, roots: dict[str, Path]) -> dict[str, Any]:
    """Every tree on every topology, each on a Redis of its own."""
    report: dict[str, Any] = {"trees": {}, "levels": LEVELS, "events_per_post": EVENTS_PER_POST}
    with tempfile.TemporaryDirectory(prefix="ifa-footprint-") as scratch:
        for place in ("single node", "cluster"):
            for label, root in roots.items():
                print(f"footprint: {label}, {place} ...", flush=True)
                directory = Path(scratch) / f"{place}-{len(report['trees'])}".replace(" ", "-")
                with topology(place, directory) as url:
                    measured = measure_tree(
                        model_dir, root, url, place == "cluster", directory / "service.log"
                    )
                    if place == "single node" and root == REPO_ROOT:
                        report["integer_set"] = integer_set_bytes(url, measured["dedup_window"])
                report["trees"].setdefault(label, {})[place] = measured
    return report


# -- soak -----------------------------------------------------------------------------------


async def fill_past_the_cap(url: str, users: list[int], limits: HistoryLimits) -> None:
    """:data:`SOAK_FILL` events per user through the store (100 per append call per user)."""
    store = RedisStore(url, prefix=PREFIX, limits=limits, timeout_seconds=5.0)
    rng = np.random.default_rng(13)
    now = time.time() - SOAK_FILL
    try:
        for first in range(0, SOAK_FILL, 100):
            batch = [
                NewEvent(f"fill-{user}-{i}", user, int(rng.integers(0, 100_000)), 0, now + i)
                for user in users
                for i in range(first, first + 100)
            ]
            await store.append_events(batch)
    finally:
        await store.close()


def sample_memory(
    client: redis.Redis, sample: list[int], stop: threading.Event, started: float
) -> list[dict[str, float]]:
    series = []
    while True:
        memory: Any = client.info("memory")
        users = [sum(measure_keys(client, user).values()) for user in sample]
        series.append(
            {
                "seconds": time.time() - started,
                "used_memory": int(memory["used_memory"]),
                "sample_user_bytes": statistics.fmean(users),
            }
        )
        if stop.wait(SOAK_SAMPLE_SECONDS):
            return series


def soak_requests(url: str, traffic: Traffic, events: np.ndarray) -> list[PreparedRequest]:
    """A prepared /events where ``events`` holds, a /rank elsewhere."""
    requests = []
    for is_event in events:
        if is_event:
            requests.append(prepare_post(url, "/events", orjson.dumps(traffic.events_body())))
        else:
            body = traffic.rank_body()
            requests.append(
                prepare_post(url, "/rank", orjson.dumps(body), traffic.expected_items(body))
            )
    return requests


def soak(model_dir: Path, seconds: float, rate: float) -> dict[str, Any]:
    users = list(range(1, SOAK_USERS + 1))
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ifa-soak-")))
        url = stack.enter_context(redis_server(scratch / "redis"))
        env = {"IFA_STORE": "redis", "IFA_REDIS_URL": url, "IFA_REDIS_PREFIX": PREFIX}
        service = stack.enter_context(
            running_service(
                model_dir, scratch / "service.log", env, args=["--log-level", "warning"]
            )
        )
        info = httpx.get(f"{service.url}/model", timeout=30).json()
        limits = HistoryLimits(max_history=info["limits"]["max_history"])
        redis_client = redis.Redis.from_url(url)
        stack.callback(redis_client.close)
        empty, _ = server_stats(redis_client)
        print(f"soak: filling {len(users)} users past the cap ...", flush=True)
        asyncio.run(fill_past_the_cap(url, users, limits))
        item_ids = list(range(100_000))
        with httpx.Client(base_url=service.url, timeout=60) as client:
            for user in users:  # a cached state each: every user's keys at their cap
                client.post("/rank", json={"user_id": user, "candidate_ids": item_ids[:100]})
        config = TrafficConfig(candidates=SOAK_CANDIDATES)
        traffic = Traffic(config, users, item_ids)
        rng = np.random.default_rng(17)
        schedule = poisson_schedule(rate, seconds, rng)
        mix = rng.random(len(schedule)) < config.events_weight / (
            config.events_weight + config.rank_weight
        )
        requests = soak_requests(service.url, traffic, mix)
        filled, _ = server_stats(redis_client)
        sample = users[:: len(users) // SOAK_SAMPLE_USERS][:SOAK_SAMPLE_USERS]
        stop = threading.Event()
        started = time.time()
        series: list[dict[str, float]] = []
        sampler = threading.Thread(
            target=lambda: series.extend(sample_memory(redis_client, sample, stop, started))
        )
        sampler.start()
        print(f"soak: {seconds:.0f} s at {rate:g} req/s ...", flush=True)
        run = run_open_loop(service.url, schedule, requests, warm_connections=8)
        stop.set()
        sampler.join()
    outcomes = run.outcomes
    by_route: dict[str, dict[str, int]] = defaultdict(lambda: {"sent": 0, "ok": 0})
    for outcome in outcomes:
        by_route[outcome.route]["sent"] += 1
        by_route[outcome.route]["ok"] += int(outcome.ok)
    # Judged after the first minute (a short run: its second half), once every worker's
    # connections and buffers exist.
    settle = min(60.0, seconds / 2)
    steady = [point for point in series if point["seconds"] >= settle]
    used = [point["used_memory"] for point in steady]
    return {
        "seconds": seconds,
        "rate": rate,
        "users": len(users),
        "filled_events_per_user": SOAK_FILL,
        "candidates": SOAK_CANDIDATES,
        "events_per_post": config.events_per_post,
        "used_memory_per_user_filled": (filled - empty) / len(users),
        "requests": dict(by_route),
        "events_posted": by_route["/events"]["ok"] * config.events_per_post,
        "series": series,
        "settle_seconds": settle,
        "used_memory_settled": {
            "min": min(used),
            "max": max(used),
            "first": used[0],
            "last": used[-1],
        },
    }


# -- report ---------------------------------------------------------------------------------


def per_user_at_cap(measured: dict[str, Any]) -> dict[str, Any]:
    return dict(measured["levels"][str(CAP_EVENTS)])


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Redis footprint per user", ""]
    if "footprint" in report:
        lines += footprint_markdown(report["footprint"])
        lines += [f"Command: `{report['footprint']['command']}`.", ""]
    if "soak" in report:
        lines += soak_markdown(report["soak"])
        lines += [f"Command: `{report['soak']['command']}`.", ""]
    return "\n".join(lines)


def footprint_markdown(footprint: dict[str, Any]) -> list[str]:
    trees = footprint["trees"]
    labels = list(trees)
    lines = [
        f"Users posted {CAP_EVENTS:,} events ({EVENTS_PER_POST} per /events) and ranked once, on a "
        "fresh Redis per tree and topology, each key measured with `MEMORY USAGE` (all "
        "samples); the mean over the users of a level. max_history "
        f"{trees[labels[-1]]['single node']['max_history']:,} (the model's), dedup window "
        + ", ".join(
            f"{trees[label]['single node']['dedup_window']:,} ({label})" for label in labels
        )
        + ".",
        "",
    ]
    for place in ("single node", "cluster"):
        lines += [f"## Bytes per user at the cap, {place}", ""]
        lines += ["| key | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        parts = sorted(
            {p for label in labels for p in per_user_at_cap(trees[label][place])["keys"]}
        )
        for part in parts:
            cells = [per_user_at_cap(trees[label][place])["keys"].get(part, 0) for label in labels]
            lines.append(f"| `{part}` | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
        totals = [per_user_at_cap(trees[label][place])["total"] for label in labels]
        lines.append("| **total** | " + " | ".join(f"**{t:,.0f}**" for t in totals) + " |")
        lines.append("| users per GiB | " + " | ".join(f"{GIB / t:,.0f}" for t in totals) + " |")
        copies = [trees[label][place]["copies"] for label in labels]
        lines.append(
            f"| used_memory per user ({COPIES} copies restored) | "
            + " | ".join(f"{c['used_memory_per_user']:,.0f}" for c in copies)
            + " |"
        )
        lines.append(
            "| server µs per EVALSHA while posting | "
            + " | ".join(f"{trees[label][place]['evalsha_usec_per_call']:.1f}" for label in labels)
            + " |"
        )
        lines.append("")
    this = trees[labels[-1]]["single node"]
    total = per_user_at_cap(this)["total"]
    verdict = "within" if total <= KIB_TARGET * 1024 else "over"
    lines += [
        f"At the cap a user costs **{total / 1024:.1f} KiB** on a single node ({verdict} the "
        f"{KIB_TARGET} KiB target).",
        "",
        "## By history posted (single node, total bytes per user)",
        "",
        "| events posted | " + " | ".join(labels) + " |",
        "|---:|" + "---:|" * len(labels),
    ]
    for events in this["levels"]:
        cells = [trees[label]["single node"]["levels"][events]["total"] for label in labels]
        lines.append(f"| {int(events):,} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    lines += [
        "",
        "This tree, by key:",
        "",
        "| events posted | " + " | ".join(f"`{p}`" for p in ("state", "log", "eids", "meta"))
        + " | total |",
        "|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for events, level in this["levels"].items():
        keys = level["keys"]
        cells = [keys.get(p, 0) for p in ("state", "log", "eids", "meta")]
        lines.append(
            f"| {int(events):,} | "
            + " | ".join(f"{c:,.0f}" for c in cells)
            + f" | {level['total']:,.0f} |"
        )
    intset = footprint.get("integer_set", {})
    if intset:
        lines += [
            "",
            f"The same {this['dedup_window']} digests as a Redis set of integers (an intset, 8 B "
            f"each): {intset.get(str(this['dedup_window']), 0):,} B, with no order to drop the "
            f"oldest by and no time to forget them by; one more digest (513) makes it a hash "
            f"table of {intset.get('513', 0):,} B. The packed string holds order and time in "
            f"{this['levels'][str(CAP_EVENTS)]['keys'].get('eids', 0):,.0f} B.",
        ]
    factor = this["copies"]["ratio"]
    lines += [
        "",
        f"## Sizing (this tree; Redis's used_memory is {factor:.3f} × the MEMORY USAGE measured, "
        f"from {COPIES} copies of a user)",
        "",
        f"Users posting r events a day, after the {RETENTION_DAYS}-day retention (30·r events "
        "posted, a cached state each); replicas double it, and Redis needs headroom for "
        "fragmentation and forks (keep maxmemory at ~70 % of the pod's memory).",
        "",
        "| users | " + " | ".join(f"{e // RETENTION_DAYS}/day" for e in SIZING_EVENTS) + " |",
        "|---:|" + "---:|" * len(SIZING_EVENTS),
    ]
    for users in SIZING_USERS:
        totals = [this["levels"][str(e)]["total"] for e in SIZING_EVENTS]
        cells = [users * total * factor / GIB for total in totals]
        lines.append(f"| {users:,} | " + " | ".join(f"{c:,.1f} GiB" for c in cells) + " |")
    lines.append("")
    return lines


def soak_markdown(soak: dict[str, Any]) -> list[str]:
    used = soak["used_memory_settled"]
    spread = (used["max"] - used["min"]) / used["min"]
    settled = [p for p in soak["series"] if p["seconds"] >= soak["settle_seconds"]]
    # The trend: least squares over the settled samples, and per event posted meanwhile.
    slope = float(
        np.polyfit([p["seconds"] for p in settled], [p["used_memory"] for p in settled], 1)[0]
    )
    trend = slope * (settled[-1]["seconds"] - settled[0]["seconds"])
    lines = [
        "## Soak",
        "",
        f"{soak['users']} users filled with {soak['filled_events_per_user']:,} events each (past "
        f"the log's keep and the digest window) and ranked once, then {soak['seconds']:.0f} s of "
        f"open-loop load at {soak['rate']:g} req/s (4:1 /rank, {soak['candidates']} candidates, "
        f"and /events of {soak['events_per_post']}): "
        + ", ".join(f"{r} {v['ok']:,} of {v['sent']:,} ok" for r, v in soak["requests"].items())
        + f", {soak['events_posted']:,} events posted. Redis used_memory after "
        f"{soak['settle_seconds']:.0f} s: "
        f"{used['min']:,} to {used['max']:,} B (spread {100 * spread:.2f} %), first "
        f"{used['first']:,}, last {used['last']:,}; its least-squares trend over that time "
        f"{trend:+,.0f} B ({trend / max(soak['events_posted'], 1):+.1f} B per event posted). "
        f"Filling the users grew it by {soak['used_memory_per_user_filled']:,.0f} B per user.",
        "",
        "| s | used_memory (B) | mean MEMORY USAGE of a sampled user (B) |",
        "|---:|---:|---:|",
    ]
    for point in soak["series"]:
        lines.append(
            f"| {point['seconds']:.0f} | {point['used_memory']:,.0f} | "
            f"{point['sample_user_bytes']:,.0f} |"
        )
    lines.append("")
    return lines


def write(out: Path, parts: dict[str, Any], command: str) -> str:
    """Merge ``parts`` into out/footprint.json (a part not run keeps its last results), write the
    markdown beside it and return it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "footprint.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report |= {name: part | {"command": command} for name, part in parts.items()}
    path.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "footprint.md").write_text(text)
    return text
