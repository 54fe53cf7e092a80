"""A team's own logs as a world directory:
``python -m model.prepare --impressions F --behaviour F --items F --out DIR``.

Three files, each Parquet (``.parquet``) or CSV (anything else, with a header row):

* the **impression log**: ``request_id``, ``user_id``, ``request_time`` (unix seconds), ``item_id``,
  ``shown`` (0/1: was the candidate shown), then one 0/1 column per action (``click``, ``cart``,
  ...): one row per candidate of each logged request. Its action columns are the vocabulary:
  every column beyond the five, in file order, or those ``--actions`` names.
* the **behaviour log**: ``user_id``, ``item_id``, ``action`` (a name: ``impression`` or one of
  the actions), ``timestamp`` (unix seconds): the histories the model attends over.
* the **item table**: ``item_id`` and any categorical attributes; ``--item-attributes`` picks the
  ones that become features. An attribute with more distinct values than ``--max-cardinality``
  is hashed into that many buckets.

What cannot be read as the contract says is an error naming the file, the column and the first
bad rows (:class:`LogError`): a missing column, a value of the wrong type, a label other than
0/1, an action on a candidate that was not shown, a request logged with two users or times, a
user's behaviour out of time order (``--sort`` sorts it instead). Rows that are well formed but
cannot be used are dropped and counted in the report, never silently: impressions of items
outside the item table, repeated candidates of a request, behaviour with an unknown action, and
behaviour at the same user and timestamp as an earlier row.

The world directory (:mod:`model.data`) declares the vocabulary and the attributes in
``world.json``; ``report.md`` / ``report.json`` beside it say what the logs hold and what was
dropped. ``--example DIR`` writes a small generated log in an e-commerce vocabulary (click, cart,
purchase) to start from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from model.data import WorldWriter, label_columns, probability_columns
from model.features import check_actions

IMPRESSION_COLUMNS = ("request_id", "user_id", "request_time", "item_id", "shown")
BEHAVIOUR_COLUMNS = ("user_id", "item_id", "action", "timestamp")
DEFAULT_MAX_CARDINALITY = 1000
SHOWN_ROWS = 5
"""Bad rows an error lists."""


class LogError(ValueError):
    """An input that does not follow the contract, named by file, column and rows."""


@dataclass
class Drops:
    """Rows left out, by reason: the report lists every one."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, count: int) -> None:
        if count:
            self.counts[reason] += int(count)


# -- reading and checking columns ----------------------------------------------------------


def read_log(path: Path) -> pa.Table:
    """A Parquet file (``.parquet``) or a CSV file with a header row."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return pq.read_table(path)
    # Columns are read as text and typed by the checks below, so a stray value is reported by
    # row rather than failing the whole read.
    names = pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(block_size=1 << 16)).column_names
    return pa_csv.read_csv(
        path, convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))
    )


def require(path: Path, table: pa.Table, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise LogError(
            f"{path}: missing column(s) {missing}; it has {table.column_names}, "
            f"and needs {list(columns)}"
        )


def _bad_rows(path: Path, column: str, rows: np.ndarray, values: Sequence[Any], why: str) -> str:
    shown = ", ".join(f"row {int(r) + 1} ({values[int(r)]!r})" for r in rows[:SHOWN_ROWS])
    more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    return f"{path}: column {column!r} {why}; first bad rows (data rows, 1-based): {shown}{more}"


def _as_float(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, bad) of a column read as numbers; nulls and unparseable text are bad."""
    if pa.types.is_timestamp(column.type):
        seconds = pc.cast(column, pa.timestamp("us")).cast(pa.int64())
        values = np.asarray(seconds.to_numpy(zero_copy_only=False), dtype=np.float64) / 1e6
        return values, np.asarray(column.is_null().to_numpy(zero_copy_only=False))
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        return values, ~np.isfinite(values)
    if pa.types.is_boolean(column.type):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        return values, np.asarray(column.is_null().to_numpy(zero_copy_only=False))
    text = column.to_pylist()
    values = np.zeros(len(text), dtype=np.float64)
    bad = np.zeros(len(text), dtype=bool)
    for i, value in enumerate(text):
        try:
            values[i] = float(value)
        except (TypeError, ValueError):
            bad[i] = True
    return values, bad | ~np.isfinite(values)


def integers(path: Path, table: pa.Table, column: str) -> np.ndarray:
    """An id column as int64; an error naming the rows that are not integers."""
    values, bad = _as_float(table.column(column))
    bad |= values != np.round(values)
    bad |= np.abs(values) >= 2.0**63
    if bad.any():
        rows = np.flatnonzero(bad)
        raise LogError(
            _bad_rows(path, column, rows, table.column(column).to_pylist(), "must hold integers")
        )
    return values.astype(np.int64)


def seconds(path: Path, table: pa.Table, column: str) -> np.ndarray:
    """A time column as float64 unix seconds (numbers or Parquet timestamps)."""
    values, bad = _as_float(table.column(column))
    bad |= values < 0
    if bad.any():
        rows = np.flatnonzero(bad)
        raise LogError(
            _bad_rows(
                path,
                column,
                rows,
                table.column(column).to_pylist(),
                "must hold unix seconds (non-negative numbers)",
            )
        )
    return values


def binary(path: Path, table: pa.Table, column: str) -> np.ndarray:
    """A 0/1 label column as int8; an error naming the rows holding anything else."""
    values, bad = _as_float(table.column(column))
    bad |= (values != 0) & (values != 1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise LogError(
            _bad_rows(path, column, rows, table.column(column).to_pylist(), "must hold 0 or 1")
        )
    return values.astype(np.int8)


# -- item attributes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    """How one item attribute's raw values became feature values ``0..buckets-1``."""

    name: str
    distinct: int
    buckets: int
    hashed: bool


def encode_attribute(values: Sequence[Any], max_cardinality: int) -> tuple[np.ndarray, int, bool]:
    """(codes, buckets, hashed): distinct raw values in sorted order get codes 0..k-1 when there
    are at most ``max_cardinality`` of them, else a stable hash of their text picks one of
    ``max_cardinality`` buckets. Missing values get -1 (out of vocabulary)."""
    text = ["" if v is None else str(v) for v in values]
    distinct = sorted({t for t in text if t})
    if len(distinct) <= max_cardinality:
        code = {t: i for i, t in enumerate(distinct)}
        return np.array([code.get(t, -1) for t in text], np.int64), max(1, len(distinct)), False
    bucket = {t: stable_bucket(t, max_cardinality) for t in distinct}
    return np.array([bucket.get(t, -1) for t in text], np.int64), max_cardinality, True


def stable_bucket(text: str, buckets: int) -> int:
    """The same bucket on every machine and run (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def read_items(
    path: Path, attributes: Sequence[str], max_cardinality: int
) -> tuple[dict[str, np.ndarray], list[Attribute]]:
    table = read_log(path)
    require(path, table, ["item_id", *attributes])
    ids = integers(path, table, "item_id")
    order = np.argsort(ids, kind="stable")
    repeated = np.flatnonzero(np.diff(ids[order]) == 0)
    if len(repeated):
        rows = np.sort(order[repeated + 1])
        raise LogError(_bad_rows(path, "item_id", rows, ids.tolist(), "repeats an item id"))
    items = {"item_id": ids[order]}
    described = []
    for name in attributes:
        codes, buckets, hashed = encode_attribute(table.column(name).to_pylist(), max_cardinality)
        items[name] = codes[order]
        distinct = len({v for v in table.column(name).to_pylist() if v not in (None, "")})
        described.append(Attribute(name, distinct, buckets, hashed))
    return items, described


# -- impressions and behaviour --------------------------------------------------------------


@dataclass
class Impressions:
    """One row per kept candidate, grouped by request in request-time order."""

    request_id: np.ndarray
    user_id: np.ndarray
    request_time: np.ndarray
    item_id: np.ndarray
    labels: np.ndarray  # (n, 1 + A) int8: shown, then each action


def read_impressions(
    path: Path, actions: Sequence[str] | None, item_ids: np.ndarray, drops: Drops
) -> tuple[Impressions, tuple[str, ...]]:
    table = read_log(path)
    require(path, table, IMPRESSION_COLUMNS)
    if actions is None:
        actions = [c for c in table.column_names if c not in IMPRESSION_COLUMNS]
    require(path, table, actions)
    vocabulary = check_actions(["impression", *actions])
    request_id = integers(path, table, "request_id")
    user_id = integers(path, table, "user_id")
    request_time = seconds(path, table, "request_time")
    item_id = integers(path, table, "item_id")
    labels = np.stack([binary(path, table, c) for c in ("shown", *actions)], axis=1)
    unshown = np.flatnonzero((labels[:, 1:] == 1).any(axis=1) & (labels[:, 0] == 0))
    if len(unshown):
        raise LogError(
            _bad_rows(
                path,
                "shown",
                unshown,
                labels[:, 0].tolist(),
                "is 0 where an action column is 1 (an action needs an impression)",
            )
        )
    _check_requests(path, request_id, user_id, request_time)

    keep = np.isin(item_id, item_ids)
    drops.add("impression rows of items missing from the item table", int((~keep).sum()))
    pairs = np.stack([request_id, item_id], axis=1)
    _, first = np.unique(pairs, axis=0, return_index=True)
    repeated = np.ones(len(item_id), dtype=bool)
    repeated[first] = False
    drops.add("impression rows repeating a candidate of the same request", int(repeated.sum()))
    keep &= ~repeated
    rows = np.flatnonzero(keep)
    # Requests in time order (ties by id), candidates in file order within each.
    order = rows[np.lexsort((rows, request_id[rows], request_time[rows]))]
    return (
        Impressions(
            request_id[order], user_id[order], request_time[order], item_id[order], labels[order]
        ),
        vocabulary,
    )


def _check_requests(
    path: Path, request_id: np.ndarray, user_id: np.ndarray, request_time: np.ndarray
) -> None:
    """Every row of a request names the same user and time."""
    order = np.argsort(request_id, kind="stable")
    same = request_id[order][1:] == request_id[order][:-1]
    for column, values in (("user_id", user_id), ("request_time", request_time)):
        differs = same & (values[order][1:] != values[order][:-1])
        if differs.any():
            rows = np.sort(order[np.flatnonzero(differs) + 1])
            raise LogError(
                _bad_rows(
                    path,
                    column,
                    rows,
                    values.tolist(),
                    "differs between rows of the same request_id",
                )
            )


def read_behaviour(
    path: Path, vocabulary: tuple[str, ...], sort: bool, drops: Drops
) -> dict[str, np.ndarray]:
    """Events sorted by user then time, actions as vocabulary indices."""
    table = read_log(path)
    require(path, table, BEHAVIOUR_COLUMNS)
    user_id = integers(path, table, "user_id")
    item_id = integers(path, table, "item_id")
    timestamp = seconds(path, table, "timestamp")
    names = ["" if a is None else str(a) for a in table.column("action").to_pylist()]
    index = {name: i for i, name in enumerate(vocabulary)}
    action = np.array([index.get(n, -1) for n in names], dtype=np.int64)
    known = action >= 0
    drops.add(f"behaviour rows with an action outside {list(vocabulary)}", int((~known).sum()))
    by_user = np.argsort(user_id, kind="stable")  # file order within each user
    same_user = user_id[by_user][1:] == user_id[by_user][:-1]
    backwards = same_user & (np.diff(timestamp[by_user]) < 0)
    if backwards.any() and not sort:
        rows = np.sort(by_user[np.flatnonzero(backwards) + 1])
        raise LogError(
            _bad_rows(
                path,
                "timestamp",
                rows,
                table.column("timestamp").to_pylist(),
                "goes back in time within a user (earlier than that user's previous row); "
                "pass --sort to sort the log",
            )
        )
    rows = np.flatnonzero(known)
    order = rows[np.lexsort((rows, timestamp[rows], user_id[rows]))]
    users, times = user_id[order], timestamp[order]
    repeated = np.concatenate([[False], (users[1:] == users[:-1]) & (times[1:] == times[:-1])])
    drops.add(
        "behaviour rows at the same user and timestamp as an earlier row", int(repeated.sum())
    )
    order = order[~repeated]
    return {
        "user_id": user_id[order],
        "item_id": item_id[order],
        "action": action[order].astype(np.int8),
        "timestamp": timestamp[order],
    }


def history_ranges(
    events: dict[str, np.ndarray], user_id: np.ndarray, request_time: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per request, the events-table rows of its user's events before ``request_time``."""
    users, times = events["user_id"], events["timestamp"]
    start = np.searchsorted(users, user_id, side="left")
    stop = np.searchsorted(users, user_id, side="right")
    end = start.copy()
    for r in range(len(user_id)):
        lo, hi = int(start[r]), int(stop[r])
        end[r] = lo + int(np.searchsorted(times[lo:hi], request_time[r], side="left"))
    return start.astype(np.int64), end.astype(np.int64)


# -- the whole preparation ------------------------------------------------------------------


def prepare(
    impressions: Path,
    behaviour: Path,
    items: Path,
    out: Path,
    item_attributes: Sequence[str] = (),
    actions: Sequence[str] | None = None,
    max_cardinality: int = DEFAULT_MAX_CARDINALITY,
    sort: bool = False,
) -> dict[str, Any]:
    """Validate the three logs, write the world directory ``out`` and its report; return the
    report. Raises :class:`LogError` on input that breaks the contract."""
    if max_cardinality < 1:
        raise LogError(f"--max-cardinality must be at least 1, got {max_cardinality}")
    drops = Drops()
    item_table, attributes = read_items(Path(items), item_attributes, max_cardinality)
    shown, vocabulary = read_impressions(Path(impressions), actions, item_table["item_id"], drops)
    events = read_behaviour(Path(behaviour), vocabulary, sort, drops)

    request_rows = np.concatenate([[0], np.flatnonzero(np.diff(shown.request_id) != 0) + 1]).astype(
        np.int64
    )
    if len(shown.request_id) == 0:
        raise LogError(f"{impressions}: no impression rows left to learn from")
    request_user = shown.user_id[request_rows]
    request_time = shown.request_time[request_rows]
    history_start, history_end = history_ranges(events, request_user, request_time)
    requests = {
        "request_id": shown.request_id[request_rows],
        "user_id": request_user,
        "request_time": request_time,
        "history_start": history_start,
        "history_end": history_end,
    }
    n = len(shown.item_id)
    candidates = {
        "request_id": shown.request_id,
        "item_id": shown.item_id,
        "source": np.zeros(n, np.int8),
        # Logs carry outcomes, not the probabilities behind them.
        **{c: np.full(n, np.nan, np.float32) for c in probability_columns(vocabulary)},
        **{c: shown.labels[:, k] for k, c in enumerate(label_columns(vocabulary))},
    }
    user_ids = np.unique(np.concatenate([shown.user_id, events["user_id"]]))
    report = _report(
        vocabulary, item_table, user_ids, requests, candidates, events, attributes, drops
    )
    meta = {
        "preset": "prepared",
        "seed": 0,
        "has_truth": False,
        "actions": list(vocabulary),
        "objectives": list(vocabulary),
        "item_attributes": [{"name": a.name, "cardinality": a.buckets} for a in attributes],
        "cardinalities": {
            "n_items": len(item_table["item_id"]),
            "n_users": len(user_ids),
            "n_categories": 0,
            "n_authors": 0,
            "profile_cardinalities": {},
        },
        "observable": {"items": ["item_id", *item_attributes], "users": ["user_id"]},
        "candidate_sources": ["logged"],
        "sources": {
            "impressions": str(impressions),
            "behaviour": str(behaviour),
            "items": str(items),
        },
        "sizes": {k: report[k] for k in ("users", "items", "requests", "candidates", "events")},
    }
    writer = WorldWriter(Path(out))
    writer.write_events(events)
    writer.finish(
        items=item_table,
        users={"user_id": user_ids},
        requests=requests,
        candidates=candidates,
        meta=meta,
    )
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (Path(out) / "report.md").write_text(report_text(report) + "\n")
    return report


def _report(
    vocabulary: tuple[str, ...],
    items: dict[str, np.ndarray],
    user_ids: np.ndarray,
    requests: dict[str, np.ndarray],
    candidates: dict[str, np.ndarray],
    events: dict[str, np.ndarray],
    attributes: list[Attribute],
    drops: Drops,
) -> dict[str, Any]:
    lengths = requests["history_end"] - requests["history_start"]
    shown = candidates["y_impression"] == 1
    rates = {"impression": float(shown.mean())}
    for name in vocabulary[1:]:
        rates[name] = float(candidates[f"y_{name}"][shown].mean()) if shown.any() else 0.0
    return {
        "actions": list(vocabulary),
        "users": len(user_ids),
        "items": len(items["item_id"]),
        "requests": len(requests["request_id"]),
        "candidates": len(candidates["item_id"]),
        "events": len(events["user_id"]),
        "history_length": {
            q: float(np.quantile(lengths, float(q[1:]) / 100)) for q in ("p50", "p90", "p99")
        }
        | {"max": int(lengths.max())},
        "label_rates": rates,
        "events_by_action": {
            name: int((events["action"] == k).sum()) for k, name in enumerate(vocabulary)
        },
        "attributes": [a.__dict__ for a in attributes],
        "dropped": dict(drops.counts),
    }


def report_text(report: dict[str, Any]) -> str:
    """The report as a short Markdown page."""
    h = report["history_length"]
    lines = [
        "# Prepared logs",
        "",
        f"actions: {', '.join(report['actions'])}",
        f"users {report['users']:,}, items {report['items']:,}, requests {report['requests']:,}, "
        f"candidates {report['candidates']:,}, behaviour events {report['events']:,}",
        f"history length per request: p50 {h['p50']:.0f}, p90 {h['p90']:.0f}, "
        f"p99 {h['p99']:.0f}, max {h['max']}",
        "",
        "| label | rate | of |",
        "|---|---|---|",
        *(
            f"| {name} | {rate:.4f} | {'candidates' if name == 'impression' else 'shown'} |"
            for name, rate in report["label_rates"].items()
        ),
        "",
        "| attribute | distinct values | feature buckets |",
        "|---|---|---|",
        *(
            f"| {a['name']} | {a['distinct']} | {a['buckets']}"
            + (" (hashed)" if a["hashed"] else "")
            + " |"
            for a in report["attributes"]
        ),
        "",
        "dropped: "
        + (
            "; ".join(f"{count:,} {reason}" for reason, count in report["dropped"].items())
            or "nothing"
        ),
    ]
    return "\n".join(lines)


# -- a small generated log to start from ----------------------------------------------------


def write_example(out: Path, seed: int = 0, n_users: int = 40, n_items: int = 150) -> None:
    """``impressions.csv``, ``behaviour.csv`` and ``items.csv`` of a small shop: users favour a
    few categories, click on them more, put some clicks in the cart and buy some of those."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    categories = [f"cat-{c}" for c in range(8)]
    item_category = rng.integers(0, len(categories), n_items)
    with (out / "items.csv").open("w") as f:
        f.write("item_id,category,brand,seller\n")
        for i in range(n_items):
            brand = f"brand-{rng.integers(0, 20)}"
            seller = f"seller-{rng.integers(0, 300)}"
            f.write(f"{1000 + i},{categories[item_category[i]]},{brand},{seller}\n")
    favourite = rng.integers(0, len(categories), (n_users, 2))
    impressions = ["request_id,user_id,request_time,item_id,shown,click,cart,purchase"]
    behaviour = ["user_id,item_id,action,timestamp"]
    start = 1_700_000_000.0
    request_id = 0
    for slot in range(15):
        for user in range(n_users):
            request_id += 1
            when = start + 3600.0 * slot + 30.0 * user
            shown_items = rng.choice(n_items, 10, replace=False)
            for rank, item in enumerate(shown_items):
                shown = int(rank < 6 or rng.random() < 0.3)
                liked = item_category[item] in favourite[user]
                click = shown * int(rng.random() < (0.6 if liked else 0.04))
                cart = click * int(rng.random() < 0.4)
                purchase = cart * int(rng.random() < 0.5)
                labels = f"{shown},{click},{cart},{purchase}"
                impressions.append(f"{request_id},{user},{when:.0f},{1000 + item},{labels}")
                if shown:
                    deepest = ("impression", "click", "cart", "purchase")[click + cart + purchase]
                    behaviour.append(f"{user},{1000 + item},{deepest},{when + 5 + rank:.0f}")
    (out / "impressions.csv").write_text("\n".join(impressions) + "\n")
    (out / "behaviour.csv").write_text("\n".join(behaviour) + "\n")


# -- command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.prepare",
        description="A team's impression log, behaviour log and item table -> a world directory.",
    )
    parser.add_argument("--impressions", type=Path, help="impression log (.parquet or CSV)")
    parser.add_argument("--behaviour", type=Path, help="behaviour log (.parquet or CSV)")
    parser.add_argument("--items", type=Path, help="item table (.parquet or CSV)")
    parser.add_argument("--out", type=Path, help="world directory to write")
    parser.add_argument(
        "--item-attributes",
        type=lambda text: [a for a in text.split(",") if a],
        default=[],
        help="comma list of item-table columns that become features, e.g. category,brand",
    )
    parser.add_argument(
        "--actions",
        type=lambda text: [a for a in text.split(",") if a],
        default=None,
        help="comma list of the impression log's action columns (default: every column "
        "after request_id,user_id,request_time,item_id,shown)",
    )
    parser.add_argument(
        "--max-cardinality",
        type=int,
        default=DEFAULT_MAX_CARDINALITY,
        help="attributes with more distinct values are hashed into this many buckets",
    )
    parser.add_argument(
        "--sort", action="store_true", help="sort a behaviour log that is out of time order"
    )
    parser.add_argument(
        "--example", type=Path, metavar="DIR", help="write a small generated log to DIR and stop"
    )
    args = parser.parse_args(argv)
    if args.example is not None:
        write_example(args.example)
        print(f"wrote {args.example}/impressions.csv, behaviour.csv, items.csv")
        return 0
    needed = ("impressions", "behaviour", "items", "out")
    absent = [f"--{name}" for name in needed if getattr(args, name) is None]
    if absent:
        parser.error(f"missing {', '.join(absent)} (or --example DIR)")
    try:
        report = prepare(
            args.impressions,
            args.behaviour,
            args.items,
            args.out,
            args.item_attributes,
            args.actions,
            args.max_cardinality,
            args.sort,
        )
    except LogError as error:
        parser.exit(2, f"error: {error}\n")
    print(report_text(report))
    print(f"\nwrote {args.out} (report: {args.out}/report.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
