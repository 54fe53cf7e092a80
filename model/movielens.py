"""MovieLens 100K as a world directory, so models are also checked on data nobody here made.

The ratings are read from ``../shared/data/ml-100k/`` beside the repository (never copied into
it) and mapped onto the ranking task as follows:

* **History.** A user's ratings in time order are their behaviour events. Each event records its
  deepest action (as the synthetic world does): ``like`` for rating 5, ``long_view`` for the
  long-view rule below, ``click`` for rating >= 4, ``impression`` otherwise. MovieLens stores
  whole seconds and many ratings share one; ties (within a user) are ordered by item id and
  spread by 1 ms each, so timestamps are strictly increasing per user as the format requires.
* **Long view.** MovieLens has no watch time, so the rule is documented rather than observed:
  a ``long_view`` is a rating >= 4 of a film released at least ``OLD_FILM_YEARS`` (10) years
  before the rating, i.e. a user going out of their way for a catalogue title. The release year
  is visible to models (it is the ``author`` field), so the rule is learnable.
* **Requests.** For each user, a request sits every ``stride`` ratings once ``min_history``
  ratings are in the past, at the midpoint between the last past rating and the next one.
* **Candidates.** The user's next ``n_next`` rated items (impressed: ``y_impression = 1``;
  ``y_click`` = rating >= 4, ``y_long_view`` = the rule above, ``y_like`` = rating 5) plus
  ``n_negatives`` items, not impressed, drawn without replacement in proportion to their
  popularity *as of the request time* (ratings by anyone before it: popular negatives, so that
  "popular" alone does not separate them) among the items that exist then (someone has rated
  them) and that the user has not rated before it (nor are among the positives). Nothing after
  the request decides a negative. A request at which fewer than ``n_negatives`` items qualify
  (the first hours of the data) is left out. Candidate order is shuffled.
* **Fields.** Category = the first listed genre (19 genres, the GroupLens ``u.genre`` order);
  author = release year (-1, out of vocabulary, where it is missing); topic = the item's whole
  genre combination (a descriptive column; no model sees it). Profile: ``age_group`` in the
  MovieLens-1M bands (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``gender`` (M 0, F 1),
  ``region`` = first digit of the zip code (10 for non-US codes) and ``occupation``.
* **No ground truth.** ``p_*`` columns are NaN and ``world.json`` says ``has_truth: false``.

Source: the GroupLens MovieLens 100K data set (F. M. Harper and J. A. Konstan, 2015, "The
MovieLens Datasets: History and Context", ACM TiiS 5(4)); research use, cite the paper.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.data import World, save_world
from model.features import ACTIONS, OBJECTIVES

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared/data/ml-100k"
FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")

GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
AGE_BANDS = (18, 25, 35, 45, 50, 56)  # lower bounds of age groups 1..6; group 0 is under 18
FOREIGN_REGION = 10
OLD_FILM_YEARS = 10
TIE_SPACING_SECONDS = 1e-3
SOURCES: tuple[str, ...] = ("next_rated", "unrated_popular")

IMPRESSION, CLICK, LONG_VIEW, LIKE = (
    ACTIONS.index(a) for a in ("impression", "click", "long_view", "like")
)


def movielens_root(root: Path | None = None) -> Path:
    """The MovieLens 100K directory; ``FileNotFoundError`` naming where it looked if absent."""
    path = Path(root) if root is not None else DEFAULT_ROOT
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MovieLens 100K not found: looked for {', '.join(missing)} in {path.resolve()} "
            "(the data lives beside the repository in ../shared/data/ml-100k/ and is never "
            "copied into it; pass root= to read it elsewhere)"
        )
    return path


def _read(path: Path) -> dict[str, list[str]]:
    """A RecBole atomic file: tab-separated, header of ``name:type``; columns as strings."""
    with path.open(encoding="latin-1") as f:
        names = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        columns: dict[str, list[str]] = {n: [] for n in names}
        for line in f:
            for name, value in zip(names, line.rstrip("\n").split("\t"), strict=True):
                columns[name].append(value)
    return columns


def _int_or(values: list[str], default: int) -> np.ndarray:
    return np.array([int(v) if v.isdigit() else default for v in values], dtype=np.int64)


def _items(raw: dict[str, list[str]]) -> dict[str, np.ndarray]:
    genre_index = {g: i for i, g in enumerate(GENRES)}
    masks, firsts = [], []
    for genres in raw["class"]:
        listed = [genre_index[g] for g in genres.split() if g in genre_index] or [0]
        firsts.append(listed[0])
        masks.append(sum(1 << g for g in listed))
    mask = np.array(masks, dtype=np.int64)
    _, combination = np.unique(mask, return_inverse=True)
    year = _int_or(raw["release_year"], -1)
    return {
        "item_id": _int_or(raw["item_id"], -1),
        "category": np.array(firsts, dtype=np.int64),
        "author": year,  # release year stands in for the author id (-1: unknown, OOV)
        "topic": combination.astype(np.int64),
        "release_year": year,
        "genre_mask": mask,
        "title": np.array(raw["movie_title"], dtype=object),
    }


def _users(raw: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], list[str]]:
    occupations = sorted(set(raw["occupation"]))
    region = np.array(
        [int(z[0]) if z[:1].isdigit() else FOREIGN_REGION for z in raw["zip_code"]], dtype=np.int64
    )
    table = {
        "user_id": _int_or(raw["user_id"], -1),
        "age_group": np.digitize(_int_or(raw["age"], 0), AGE_BANDS).astype(np.int64),
        "gender": np.array([0 if g == "M" else 1 for g in raw["gender"]], dtype=np.int64),
        "region": region,
        "occupation": np.array([occupations.index(o) for o in raw["occupation"]], dtype=np.int64),
    }
    return table, occupations


def _rating_year(timestamps: np.ndarray) -> np.ndarray:
    return timestamps.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970


def load_movielens(
    root: Path | None = None,
    *,
    seed: int = 0,
    min_history: int = 10,
    stride: int = 10,
    n_next: int = 5,
    n_negatives: int = 20,
) -> World:
    """MovieLens 100K as an in-memory :class:`model.data.World` (see the module docstring)."""
    path = movielens_root(root)
    items = _items(_read(path / "ml-100k.item"))
    users, occupations = _users(_read(path / "ml-100k.user"))
    ratings = _read(path / "ml-100k.inter")
    user = _int_or(ratings["user_id"], -1)
    item = _int_or(ratings["item_id"], -1)
    rating = np.array([float(r) for r in ratings["rating"]]).astype(np.int64)
    seconds = np.array([float(t) for t in ratings["timestamp"]])

    order = np.lexsort((item, seconds, user))
    user, item, rating, seconds = user[order], item[order], rating[order], seconds[order]
    # Spread ratings of one user within one second by 1 ms each (ordered by item id).
    starts_run = np.r_[True, (user[1:] != user[:-1]) | (seconds[1:] != seconds[:-1])]
    run_start = np.maximum.accumulate(np.where(starts_run, np.arange(len(user)), 0))
    timestamp = seconds + TIE_SPACING_SECONDS * (np.arange(len(user)) - run_start)

    item_row = np.searchsorted(items["item_id"], item)
    year = items["release_year"][item_row]
    clicked = rating >= 4
    long_view = clicked & (year >= 0) & (year <= _rating_year(seconds) - OLD_FILM_YEARS)
    liked = rating == 5
    action = np.where(
        liked, LIKE, np.where(long_view, LONG_VIEW, np.where(clicked, CLICK, IMPRESSION))
    )
    events = {
        "user_id": user,
        "item_id": item,
        "action": action.astype(np.int8),
        "timestamp": timestamp,
    }
    outcomes = np.stack([np.ones(len(user), dtype=bool), clicked, long_view, liked], axis=1)

    # Requests: every ``stride`` ratings of a user once ``min_history`` are in the past.
    user_starts = np.searchsorted(user, users["user_id"])
    user_ends = np.searchsorted(user, users["user_id"], side="right")
    slots = [
        (int(uid), int(lo), first_next, min(first_next + n_next, int(hi)))
        for uid, lo, hi in zip(users["user_id"], user_starts, user_ends, strict=True)
        for first_next in range(int(lo) + min_history, int(hi), stride)
    ]
    times = np.array([0.5 * (timestamp[f - 1] + timestamp[f]) for _, _, f, _ in slots])
    req: dict[str, list[Any]] = {
        k: [] for k in ("user_id", "request_time", "history_start", "history_end")
    }
    cand: dict[str, list[np.ndarray]] = {"item_id": [], "source": [], "labels": []}
    # Negatives see only the past: the catalogue and each item's popularity are those of the
    # ratings before the request (in time order over all users), so an item nobody has rated
    # yet is never a candidate and popularity never counts a future rating.
    by_time = np.argsort(timestamp, kind="stable")
    popularity = np.zeros(len(items["item_id"]), dtype=np.float64)
    seen = 0
    for k in np.argsort(times, kind="stable"):
        uid, lo, first_next, next_end = slots[k]
        request_time = times[k]
        while seen < len(by_time) and timestamp[by_time[seen]] < request_time:
            popularity[item_row[by_time[seen]]] += 1.0
            seen += 1
        eligible = popularity.copy()
        eligible[item_row[lo:first_next]] = 0.0  # rated by the user already
        nxt = np.arange(first_next, next_end)
        eligible[item_row[nxt]] = 0.0  # the positives themselves
        if np.count_nonzero(eligible) < n_negatives:
            continue  # the first hours of the data: too few items exist yet
        # One generator per request, keyed by its user and history length: the draw of one
        # request never depends on how many requests (or ratings) come after it.
        rng = np.random.default_rng([seed, uid, first_next - lo])
        negatives = rng.choice(
            len(eligible), size=n_negatives, replace=False, p=eligible / eligible.sum()
        )
        ids = np.concatenate([item[nxt], items["item_id"][negatives]])
        labels = np.concatenate(
            [outcomes[nxt], np.zeros((n_negatives, len(OBJECTIVES)), dtype=bool)]
        )
        sources = np.repeat(np.arange(2, dtype=np.int8), [len(nxt), n_negatives])
        shuffle = rng.permutation(len(ids))
        req["user_id"].append(uid)
        req["request_time"].append(request_time)
        req["history_start"].append(lo)
        req["history_end"].append(first_next)
        cand["item_id"].append(ids[shuffle])
        cand["source"].append(sources[shuffle])
        cand["labels"].append(labels[shuffle])

    request_order = np.argsort(np.asarray(req["request_time"]), kind="stable")
    requests = {k: np.asarray(v)[request_order] for k, v in req.items()}
    n_requests = len(request_order)
    requests = {"request_id": np.arange(n_requests, dtype=np.int64), **requests}
    per_request = [len(cand["item_id"][i]) for i in request_order]
    labels = np.concatenate([cand["labels"][i] for i in request_order]).astype(np.int8)
    candidates: dict[str, np.ndarray] = {
        "request_id": np.repeat(requests["request_id"], per_request),
        "item_id": np.concatenate([cand["item_id"][i] for i in request_order]),
        "source": np.concatenate([cand["source"][i] for i in request_order]),
        **{f"p_{o}": np.full(len(labels), np.nan, dtype=np.float32) for o in OBJECTIVES},
        **{f"y_{o}": labels[:, k] for k, o in enumerate(OBJECTIVES)},
    }
    meta = {
        "generator": "model.movielens",
        "preset": "movielens-100k",
        "seed": seed,
        "has_truth": False,
        "source_dir": str(path.resolve()),
        "sizes": {
            "n_users": len(users["user_id"]),
            "n_items": len(items["item_id"]),
            "n_events": len(user),
            "n_requests": n_requests,
            "n_candidates": len(labels),
            "candidates_per_request": n_next + n_negatives,
        },
        "cardinalities": {
            "n_items": len(items["item_id"]),
            "n_users": len(users["user_id"]),
            "n_categories": len(GENRES),
            "n_authors": len(np.unique(items["author"][items["author"] >= 0])),
            "n_topics": int(items["topic"].max()) + 1,
            "profile_cardinalities": {
                "age_group": len(AGE_BANDS) + 1,
                "gender": 2,
                "region": FOREIGN_REGION + 1,
                "occupation": len(occupations),
            },
        },
        "observable": {
            "items": ["item_id", "category", "author"],
            "users": ["user_id", "age_group", "gender", "region", "occupation"],
        },
        "latent": {"items": ["topic", "release_year", "genre_mask", "title"], "users": []},
        "actions": list(ACTIONS),
        "objectives": list(OBJECTIVES),
        "candidate_sources": list(SOURCES),
        "genres": list(GENRES),
        "occupations": occupations,
        "mapping": {
            "events": "ratings in time order; action = like (5) > long_view > click (>=4) "
            "> impression",
            "long_view": f"rating >= 4 and release_year <= rating year - {OLD_FILM_YEARS}",
            "requests": f"every {stride} ratings after {min_history}, midway between two ratings",
            "candidates": f"next {n_next} rated items (impressed) + {n_negatives} items "
            "existing and unrated by the user at request time, drawn by popularity at request "
            "time (not impressed)",
            "timestamps": f"ties within a user spread by {TIE_SPACING_SECONDS} s in item-id order",
        },
        "parameters": {
            "min_history": min_history,
            "stride": stride,
            "n_next": n_next,
            "n_negatives": n_negatives,
        },
    }
    return World(
        meta=meta, items=items, users=users, events=events, requests=requests, candidates=candidates
    )


def write_movielens_world(out: Path, root: Path | None = None, **options: Any) -> World:
    """Build the MovieLens world (``options`` as :func:`load_movielens` takes) and save it."""
    world = load_movielens(root, **options)
    save_world(world, Path(out))
    return world


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write MovieLens 100K as a world directory.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--root", type=Path, default=None, help=f"data directory (default {DEFAULT_ROOT})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-history", type=int, default=10)
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--n-next", type=int, default=5)
    parser.add_argument("--n-negatives", type=int, default=20)
    args = parser.parse_args(argv)
    world = write_movielens_world(
        args.out,
        args.root,
        seed=args.seed,
        min_history=args.min_history,
        stride=args.stride,
        n_next=args.n_next,
        n_negatives=args.n_negatives,
    )
    c = world.candidates
    shown = c["y_impression"].astype(bool)
    print(f"wrote {args.out}")
    print(
        json.dumps(
            {
                **world.meta["sizes"],
                "rates_given_impression": {
                    o: float(c[f"y_{o}"][shown].mean()) for o in OBJECTIVES[1:]
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
