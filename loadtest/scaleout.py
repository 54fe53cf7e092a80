"""Scale-out figures: /events ingestion and /rank latency on one Redis node vs a Redis Cluster.

    python -m loadtest.scaleout [--model-dir artifacts] [--users 200] [--ingest-seconds 10]

On this machine, all traffic to 127.0.0.1:

1. a world of ``--users`` users with ``--events-per-user`` events each is written, and a private
   ``redis-server`` and a private three-master Redis Cluster (``redis-cli --cluster create``)
   are started;
2. two ``python -m service`` processes (one uvicorn worker each) start at once, one per store,
   each seeding its store from the world;
3. ingestion: ``--concurrency`` concurrent posts of ``--batch`` events (over ``--batch-users``
   users, so a batch touches that many slots) for ``--ingest-seconds``, in rounds that alternate
   between the two services (so that the shared machine's drifts hit both); events/s accepted;
4. /rank: every user's state is cached, then ``--rank-requests`` requests per service are sent
   one at a time, alternating between the services (same user and candidates in each pair):
   client-side p50/p99 and the server's state-fetch stage (the store round trip) p50/p99.

Writes ``<out>.md`` and ``<out>.json`` (default ``results/scaleout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson

from loadtest.capacity import (
    bucket_quantile,
    catalogue_item_ids,
    delta,
    describe_machine,
    ensure_model,
    finite,
    machine,
    scrape,
    table_row,
)
from loadtest.harness import (
    LiveService,
    redis_cluster,
    redis_server,
    running_service,
    warm_state_cache,
    write_world,
)

STORES = ("node", "cluster")
ACTIONS = ("impression", "click", "long_view", "like")
REDIS_PREFIX = "ifa"


@dataclass(frozen=True)
class Ingestion:
    store: str
    round: int
    seconds: float
    posts: int
    events_accepted: int
    events_per_s: float
    post_p50_ms: float
    post_p99_ms: float
    failures: int


@dataclass(frozen=True)
class RankLatency:
    store: str
    requests: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    server_state_fetch_p50_ms: float
    server_state_fetch_p99_ms: float
    failures: int


# -- the two services ---------------------------------------------------------------------------


@contextmanager
def services(
    model_dir: Path, world: Path, work: Path, torch_threads: int
) -> Iterator[dict[str, LiveService]]:
    """One service on a single Redis node and one on a three-master cluster, both seeded."""
    with ExitStack() as stack:
        node_url = stack.enter_context(redis_server(work / "redis-node"))
        cluster = stack.enter_context(redis_cluster(work / "redis-cluster"))
        common = {
            "IFA_STORE": "redis",
            "IFA_REDIS_PREFIX": REDIS_PREFIX,
            "IFA_SEED_WORLD": str(world),
            "IFA_TORCH_THREADS": str(torch_threads),
        }
        envs = {
            "node": common | {"IFA_REDIS_URL": node_url},
            "cluster": common | {"IFA_REDIS_URL": cluster.url, "IFA_REDIS_CLUSTER": "true"},
        }
        yield {
            store: stack.enter_context(
                running_service(model_dir, work / f"service-{store}.log", env=envs[store])
            )
            for store in STORES
        }


# -- ingestion -------------------------------------------------------------------------------


class Batches:
    """Serialised /events bodies with fresh event ids, built ahead of the clock."""

    def __init__(
        self, tag: str, users: int, items: np.ndarray, batch: int, batch_users: int
    ) -> None:
        self.tag, self.users, self.items = tag, users, items
        self.batch, self.batch_users = batch, batch_users
        self.rng = np.random.default_rng(zlib.crc32(tag.encode()))
        self.serial = 0

    def next(self) -> bytes:
        per_user = self.batch // self.batch_users
        users = self.rng.choice(self.users, self.batch_users, replace=False)
        items = self.rng.choice(self.items, self.batch)
        actions = self.rng.integers(0, len(ACTIONS), self.batch)
        now = time.time()
        events = []
        for i in range(self.batch):
            self.serial += 1
            events.append({
                "event_id": f"{self.tag}-{self.serial}",
                "user_id": int(users[i // per_user % self.batch_users]),
                "item_id": int(items[i]),
                "action": ACTIONS[actions[i]],
                "timestamp": now + i * 1e-3,
            })  # fmt: skip
        return orjson.dumps({"events": events})


async def ingest(
    service: LiveService, batches: Batches, seconds: float, concurrency: int
) -> tuple[int, int, list[float], int, float]:
    """(posts, events accepted, post latencies s, failures, elapsed s) of a closed loop."""
    bodies = [batches.next() for _ in range(concurrency * 4)]
    latencies: list[float] = []
    accepted = failures = posts = 0
    headers = {"content-type": "application/json"}

    async def worker(client: httpx.AsyncClient, until: float) -> None:
        nonlocal accepted, failures, posts
        while time.perf_counter() < until:
            body = bodies.pop() if bodies else batches.next()
            started = time.perf_counter()
            response = await client.post("/events", content=body, headers=headers)
            latencies.append(time.perf_counter() - started)
            posts += 1
            if response.status_code == 200:
                accepted += int(response.json()["accepted"])
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(worker(client, until) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return posts, accepted, latencies, failures, elapsed


def run_ingestion(
    running: dict[str, LiveService],
    users: int,
    items: np.ndarray,
    args: argparse.Namespace,
) -> list[Ingestion]:
    results = []
    for round_ in range(args.rounds):
        order = STORES if round_ % 2 == 0 else STORES[::-1]
        for store in order:
            batches = Batches(f"{store}-r{round_}", users, items, args.batch, args.batch_users)
            posts, accepted, latencies, failures, elapsed = asyncio.run(
                ingest(running[store], batches, args.ingest_seconds, args.concurrency)
            )
            ms = np.array(latencies) * 1000
            result = Ingestion(
                store=store,
                round=round_,
                seconds=round(elapsed, 2),
                posts=posts,
                events_accepted=accepted,
                events_per_s=accepted / elapsed,
                post_p50_ms=float(np.percentile(ms, 50)),
                post_p99_ms=float(np.percentile(ms, 99)),
                failures=failures,
            )
            print(
                f"[ingest {store} round {round_}] {result.events_per_s:,.0f} events/s "
                f"({posts} posts, p50 {result.post_p50_ms:.1f} ms, p99 {result.post_p99_ms:.1f} "
                f"ms, {failures} failed)",
                flush=True,
            )
            results.append(result)
    return results


# -- /rank latency -----------------------------------------------------------------------------


def run_rank(
    running: dict[str, LiveService], users: int, items: np.ndarray, args: argparse.Namespace
) -> list[RankLatency]:
    rng = np.random.default_rng(7)
    candidates = items[: args.candidates].tolist()
    for service in running.values():
        warm_state_cache(service.url, range(users), candidates)
    before = {store: scrape(service.url) for store, service in running.items()}
    latencies: dict[str, list[float]] = {store: [] for store in STORES}
    failures = dict.fromkeys(STORES, 0)
    clients = {store: httpx.Client(base_url=s.url, timeout=30) for store, s in running.items()}
    try:
        for i in range(args.rank_requests):
            body = orjson.dumps(
                {"user_id": int(rng.integers(0, users)), "candidate_ids": candidates, "k": 50}
            )
            order = STORES if i % 2 == 0 else STORES[::-1]
            for store in order:
                started = time.perf_counter()
                response = clients[store].post(
                    "/rank", content=body, headers={"content-type": "application/json"}
                )
                latencies[store].append(time.perf_counter() - started)
                failures[store] += response.status_code != 200
    finally:
        for client in clients.values():
            client.close()
    results = []
    for store, service in running.items():
        buckets = {
            float(dict(labels)["le"]): value
            for labels, value in delta(
                before[store], scrape(service.url), "ifa_rank_stage_duration_seconds_bucket",
                stage="state_fetch",
            ).items()
        }  # fmt: skip
        ms = np.array(latencies[store]) * 1000
        result = RankLatency(
            store=store,
            requests=len(ms),
            p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            mean_ms=float(ms.mean()),
            server_state_fetch_p50_ms=1000 * bucket_quantile(0.50, buckets),
            server_state_fetch_p99_ms=1000 * bucket_quantile(0.99, buckets),
            failures=failures[store],
        )
        print(
            f"[rank {store}] p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms; state "
            f"fetch p50 {result.server_state_fetch_p50_ms:.2f} ms, p99 "
            f"{result.server_state_fetch_p99_ms:.2f} ms",
            flush=True,
        )
        results.append(result)
    return results


# -- the report -------------------------------------------------------------------------------


def to_markdown(
    report: dict[str, object], ingestion: list[Ingestion], ranks: list[RankLatency]
) -> str:
    setup = report["setup"]
    assert isinstance(setup, dict)
    rate = {s: statistics.mean(r.events_per_s for r in ingestion if r.store == s) for s in STORES}
    by_store = {r.store: r for r in ranks}
    node, cluster = by_store["node"], by_store["cluster"]
    lines = [
        "# Scale-out: one Redis node against a Redis Cluster",
        "",
        f"Generated by `python -m loadtest.scaleout` on {report['date']}. Model "
        f"`{setup['model_version']}`; {setup['users']} users seeded with "
        f"{setup['events_per_user']:,} events each; one uvicorn worker per service, "
        f"{setup['torch_threads']} torch thread; private redis-server and a private "
        "three-master Redis Cluster (no replicas, no persistence) on the same machine as the "
        f"services and the load generator. Machine: {describe_machine(report['machine'])}.",
        "",
        "## Ingestion through /events",
        "",
        f"{setup['concurrency']} concurrent posts in a closed loop, {setup['batch']} events per "
        f"post over {setup['batch_users']} users (so one post touches {setup['batch_users']} "
        f"slots: one EVALSHA per user, one pipelined round trip per Redis node), "
        f"{setup['ingest_seconds']} s per round; rounds alternate between the two stores.",
        "",
        "| store | mean events/s | rounds (events/s) | post p50 ms | post p99 ms | failed posts |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for store in STORES:
        runs = [r for r in ingestion if r.store == store]
        lines.append(table_row([
            store, f"{rate[store]:,.0f}", ", ".join(f"{r.events_per_s:,.0f}" for r in runs),
            f"{statistics.median(r.post_p50_ms for r in runs):.1f}",
            f"{max(r.post_p99_ms for r in runs):.1f}", sum(r.failures for r in runs),
        ]))  # fmt: skip
    lines += [
        "",
        "## /rank latency, same run",
        "",
        f"{setup['rank_requests']} requests per store, one at a time, alternating between the "
        f"two services (each pair asks for the same user and the same {setup['candidates']:,} "
        "candidates); every user's state cached beforehand. Client-side times; the state "
        "fetch (the snapshot script's round trip) from each service's own histogram.",
        "",
        "| store | /rank p50 ms | /rank p99 ms | mean ms | state fetch p50 ms | state fetch p99 ms "
        "| failures |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ranks:
        lines.append(table_row([
            r.store, f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.mean_ms:.2f}",
            f"{r.server_state_fetch_p50_ms:.3f}", f"{r.server_state_fetch_p99_ms:.3f}",
            r.failures,
        ]))  # fmt: skip
    lines += [
        "",
        f"The cluster's extra cost per /rank: {cluster.p50_ms - node.p50_ms:+.2f} ms at p50, "
        f"{cluster.p99_ms - node.p99_ms:+.2f} ms at p99 (client side), "
        f"{cluster.server_state_fetch_p50_ms - node.server_state_fetch_p50_ms:+.3f} ms at p50 in "
        "the state fetch. Ingestion on the cluster runs at "
        f"{rate['cluster'] / rate['node']:.0%} of the single node's rate. The state fetch "
        "isolates the store's share; the end-to-end tails also carry the CPU contention of a "
        "shared machine running two services, four Redis servers and the load generator (see "
        "the load average above), so read a p99 difference of a few ms as noise.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--out", type=Path, default=Path("results/scaleout"),
                        help="writes <out>.md and <out>.json")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path("runs/scaleout"))
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--events-per-user", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500, help="events per /events post")
    parser.add_argument("--batch-users", type=int, default=100, help="users per /events post")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent posts")
    parser.add_argument("--ingest-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="ingestion rounds per store")
    parser.add_argument("--rank-requests", type=int, default=500, help="per store")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--torch-threads", type=int, default=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch % args.batch_users or args.batch_users > args.users:
        raise SystemExit("--batch must be a multiple of --batch-users, at most --users")
    started = time.time()
    ensure_model(args.model_dir)
    version, item_ids = catalogue_item_ids(args.model_dir)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    world = write_world(work / "world", item_ids, args.users, args.events_per_user)
    with services(args.model_dir, world, work, args.torch_threads) as running:
        ingestion = run_ingestion(running, args.users, item_ids, args)
        ranks = run_rank(running, args.users, item_ids, args)

    report: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": round(time.time() - started),
        "machine": machine(),
        "setup": {
            "model_version": version,
            "users": args.users,
            "events_per_user": args.events_per_user,
            "batch": args.batch,
            "batch_users": args.batch_users,
            "concurrency": args.concurrency,
            "ingest_seconds": args.ingest_seconds,
            "rounds": args.rounds,
            "rank_requests": args.rank_requests,
            "candidates": args.candidates,
            "torch_threads": args.torch_threads,
            "cluster_masters": 3,
        },
        "ingestion": [asdict(r) for r in ingestion],
        "rank": [asdict(r) for r in ranks],
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(finite(report), indent=2) + "\n")
    Path(f"{out}.md").write_text(to_markdown(report, ingestion, ranks))
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
