"""Replay a world's behaviour log into a running service, then rank its last requests:
``python -m service.replay --world DIR [--url http://127.0.0.1:8000] [--requests 3]``.

Every event of ``events.parquet`` goes through ``POST /events`` under its action's name (the
world's vocabulary; the service refuses names its model does not know), in posts of the
service's ``max_events_per_post``; event ids are ``<user>-<row>``, so a second replay only
finds duplicates. Then the world's last ``--requests`` requests are ranked with ``POST /rank``
over their logged candidates, and the top items printed beside what the user did with them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from model.data import World, label_columns, load_world


def wait_ready(client: httpx.Client, timeout: float) -> dict[str, Any]:
    """GET /model once /readyz answers 200 (the service may still be loading its model)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                info: dict[str, Any] = client.get("/model").raise_for_status().json()
                return info
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no ready service at {client.base_url} after {timeout:.0f} s")
        time.sleep(0.5)


def event_posts(world: World, batch: int) -> list[list[dict[str, Any]]]:
    """The behaviour log as /events bodies' event lists, ``batch`` events each."""
    events, names = world.events, world.actions
    rows = [
        {
            "event_id": f"{int(user)}-{row}",
            "user_id": int(user),
            "item_id": int(item),
            "action": names[int(action)],
            "timestamp": float(timestamp),
        }
        for row, (user, item, action, timestamp) in enumerate(
            zip(
                events["user_id"].tolist(),
                events["item_id"].tolist(),
                events["action"].tolist(),
                events["timestamp"].tolist(),
                strict=True,
            )
        )
    ]
    return [rows[i : i + batch] for i in range(0, len(rows), batch)]


def replay(client: httpx.Client, world: World, batch: int) -> tuple[int, int]:
    """(accepted, duplicates) over the whole behaviour log."""
    accepted = duplicates = 0
    for events in event_posts(world, batch):
        answer = client.post("/events", json={"events": events})
        if answer.status_code != 200:
            raise SystemExit(f"POST /events answered {answer.status_code}: {answer.text}")
        body = answer.json()
        accepted += int(body["accepted"])
        duplicates += int(body["duplicates"])
    return accepted, duplicates


def rank_last(client: httpx.Client, world: World, count: int, k: int) -> list[str]:
    """Rank the world's last ``count`` requests; lines of what the top ``k`` were and got."""
    labels = label_columns(world.objectives)
    lines = []
    for row in range(max(0, world.n_requests - count), world.n_requests):
        rows = world.candidate_rows(row)
        candidates = world.candidates["item_id"][rows]
        user = int(world.requests["user_id"][row])
        answer = client.post(
            "/rank",
            json={"user_id": user, "candidate_ids": candidates.tolist(), "k": k},
        )
        if answer.status_code != 200:
            raise SystemExit(f"POST /rank answered {answer.status_code}: {answer.text}")
        body = answer.json()
        outcome = {
            int(item): [name for name, c in zip(world.objectives, labels, strict=True) if y[c]]
            for item, y in zip(
                candidates.tolist(),
                (
                    {c: int(world.candidates[c][r]) for c in labels}
                    for r in range(rows.start, rows.stop)
                ),
                strict=True,
            )
        }
        lines.append(
            f"user {user}, request {int(world.requests['request_id'][row])}: "
            f"{len(candidates)} candidates, history {body['history_length']} events"
        )
        for item in body["items"]:
            got = ", ".join(outcome.get(int(item["item_id"]), [])) or "not shown"
            lines.append(f"  item {item['item_id']:>8}  score {item['score']:.4f}  logged: {got}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.replay",
        description="POST a world's behaviour log to /events, then /rank its last requests.",
    )
    parser.add_argument("--world", type=Path, required=True, help="world directory")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    parser.add_argument("--requests", type=int, default=3, help="last requests to rank")
    parser.add_argument("--k", type=int, default=5, help="items shown per ranked request")
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the service to be ready"
    )
    args = parser.parse_args(argv)
    world = load_world(args.world)
    with httpx.Client(base_url=args.url, timeout=30.0) as client:
        info = wait_ready(client, args.wait)
        foreign = sorted(set(world.actions) - set(info["actions"]))
        if foreign:
            print(
                f"the served model ({info['version']}) does not know the actions {foreign} "
                f"of {args.world}; it knows {info['actions']}",
                file=sys.stderr,
            )
            return 2
        batch = int(info["limits"]["max_events_per_post"])
        accepted, duplicates = replay(client, world, batch)
        print(
            f"replayed {len(world.events['user_id']):,} events to {args.url}: "
            f"{accepted:,} accepted, {duplicates:,} duplicates"
        )
        print(f"model {info['version']}: objectives {info['objectives']}, fusion {info['fusion']}")
        for line in rank_last(client, world, args.requests, args.k):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
