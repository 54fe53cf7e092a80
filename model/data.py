"""World directories on disk, and the pipeline that turns them into requests and batches.

A *world* is one directory, written by :mod:`model.world` (synthetic) or :mod:`model.movielens`
(real ratings), that every trainer, evaluator and the service read the same way:

``items.parquet``       item_id int64 (sorted), category int64, author int64, topic int64, plus
                        latent or descriptive columns (``world.json`` says which are observable);
                        or, where ``world.json`` declares ``item_attributes`` (a prepared log,
                        :mod:`model.prepare`), item_id and those int64 attribute columns.
``users.parquet``       user_id int64 (sorted), profile columns (``age_group``, ``gender``, ...).
``events.parquet``      user_id int64, item_id int64, action int8 (index into the world's
                        action vocabulary), timestamp float64 unix seconds; sorted by
                        user then time, timestamps strictly increasing per user.
``requests.parquet``    request_id int64, user_id int64, request_time float64,
                        history_start / history_end int64: the row range of ``events.parquet``
                        holding that user's events with ``timestamp < request_time``. Rows are in
                        global ``request_time`` order, the order in which the stream is replayed.
``candidates.parquet``  request_id, item_id int64, source int8 (index into
                        ``world.json["candidate_sources"]``), ``p_<objective>`` float32 per
                        objective (p_impression, then the action probabilities *conditional on
                        impression*; NaN where the world has no ground truth), ``y_<objective>``
                        int8 (action labels are joint: y_a = 1 implies y_impression = 1).
                        Grouped by request, in request order.
``world.json``          preset, seed, sizes, cardinalities for the feature spec, which columns are
                        observable, a description of the mechanisms, and the vocabulary:
                        ``actions`` (event action values index it; every action is an
                        objective, so ``objectives``, where present, lists them impression
                        first). A world without ``actions``
                        predates declared vocabularies and reads as
                        :data:`model.features.ACTIONS`.

Histories are stored once and sliced per request (``history_start:history_end``), never copied
into samples.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.batch import Batch, Request, collate
from model.features import (
    ACTIONS,
    OBJECTIVES,
    FeatureSpec,
    Field,
    check_actions,
    default_spec,
    known_id_tuple,
    objectives_of,
)
from model.metrics import objective_aucs

Table = dict[str, np.ndarray]
"""A table as named numpy columns of equal length."""

FORMAT_VERSION = 1

TABLE_FILES = {
    "items": "items.parquet",
    "users": "users.parquet",
    "events": "events.parquet",
    "requests": "requests.parquet",
    "candidates": "candidates.parquet",
}

# Required columns and their on-disk types; tables may carry more columns, which pass through.
SCHEMAS: dict[str, dict[str, np.dtype[Any]]] = {
    "items": {
        "item_id": np.dtype(np.int64),
        "category": np.dtype(np.int64),
        "author": np.dtype(np.int64),
        "topic": np.dtype(np.int64),
    },
    "users": {"user_id": np.dtype(np.int64)},
    "events": {
        "user_id": np.dtype(np.int64),
        "item_id": np.dtype(np.int64),
        "action": np.dtype(np.int8),
        "timestamp": np.dtype(np.float64),
    },
    "requests": {
        "request_id": np.dtype(np.int64),
        "user_id": np.dtype(np.int64),
        "request_time": np.dtype(np.float64),
        "history_start": np.dtype(np.int64),
        "history_end": np.dtype(np.int64),
    },
    "candidates": {
        "request_id": np.dtype(np.int64),
        "item_id": np.dtype(np.int64),
        "source": np.dtype(np.int8),
        **{f"p_{name}": np.dtype(np.float32) for name in OBJECTIVES},
        **{f"y_{name}": np.dtype(np.int8) for name in OBJECTIVES},
    },
}
"""The default vocabulary's schemas; :func:`schema` gives any world's."""


def probability_columns(objectives: tuple[str, ...] = OBJECTIVES) -> tuple[str, ...]:
    """p_impression, then p(action | impression) per action, in objective order."""
    return tuple(f"p_{name}" for name in objectives)


def label_columns(objectives: tuple[str, ...] = OBJECTIVES) -> tuple[str, ...]:
    """y_impression, then the joint action labels, in objective order."""
    return tuple(f"y_{name}" for name in objectives)


PROBABILITY_COLUMNS: tuple[str, ...] = probability_columns()
LABEL_COLUMNS: tuple[str, ...] = label_columns()


def meta_actions(meta: dict[str, Any]) -> tuple[str, ...]:
    """The action vocabulary ``world.json`` declares; the default one where it declares none
    (worlds written before vocabularies were declared)."""
    actions = check_actions(meta.get("actions", ACTIONS))
    expected = objectives_of(actions)
    if tuple(meta.get("objectives", expected)) != expected:
        raise ValueError(
            f"world.json objectives {meta['objectives']} are not {list(expected)}: every action "
            "is an objective, impression first"
        )
    return actions


def world_actions(path: Path) -> tuple[str, ...]:
    """The vocabulary of the world directory at ``path``, from its ``world.json`` alone (the
    default vocabulary where there is none: bare event tables, as seeding accepts)."""
    meta_file = Path(path) / "world.json"
    return meta_actions(json.loads(meta_file.read_text()) if meta_file.is_file() else {})


def schema(name: str, meta: dict[str, Any]) -> dict[str, np.dtype[Any]]:
    """Required columns and types of table ``name`` in a world described by ``meta``."""
    if name == "items" and "item_attributes" in meta:
        names = [a["name"] for a in meta["item_attributes"]]
        return {c: np.dtype(np.int64) for c in ("item_id", *names)}
    if name != "candidates":
        return SCHEMAS[name]
    objectives = objectives_of(meta_actions(meta))
    return {
        **{c: d for c, d in SCHEMAS[name].items() if c[:2] not in ("p_", "y_")},
        **{c: np.dtype(np.float32) for c in probability_columns(objectives)},
        **{c: np.dtype(np.int8) for c in label_columns(objectives)},
    }


def _conform(name: str, table: Table, meta: dict[str, Any] | None = None) -> Table:
    """Cast required columns to their schema types; raise naming any missing column."""
    required = schema(name, meta or {})
    out = {k: np.asarray(v) for k, v in table.items()}
    missing = [c for c in required if c not in out]
    if missing:
        raise ValueError(f"{name} table lacks required columns {missing}")
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise ValueError(f"{name} table columns differ in length: {sorted(lengths)}")
    for column, dtype in required.items():
        out[column] = out[column].astype(dtype, copy=False)
    return out


def _arrow(table: Table) -> pa.Table:
    return pa.table({k: pa.array(v) for k, v in table.items()})


@dataclass
class _Features:
    """Feature rows cached per (world, spec): every request is then a handful of gathers."""

    item_rows: np.ndarray  # (n_items, F_item) int64, row i for items["item_id"][i]
    user_rows: np.ndarray  # (n_users, F_user) int64
    event_item_rows: np.ndarray  # (n_events, F_item) int64
    candidate_item_rows: np.ndarray  # (n_candidates, F_item) int64
    request_user_rows: np.ndarray  # (n_requests, F_user) int64
    labels: np.ndarray  # (n_candidates, n_objectives) float32


@dataclass
class World:
    """All tables of one world as numpy columns, plus ``world.json`` as ``meta``.

    Items and users are sorted by id; candidates are grouped by request in request order, so
    request row ``r`` owns candidate rows ``candidate_offsets[r]:candidate_offsets[r + 1]``.
    """

    meta: dict[str, Any]
    items: Table
    users: Table
    events: Table
    requests: Table
    candidates: Table
    path: Path | None = None
    candidate_offsets: np.ndarray = field(init=False, repr=False)  # (n_requests + 1,) int64
    _features: dict[FeatureSpec, _Features] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.items = _sorted_by(_conform("items", self.items, self.meta), "item_id")
        self.users = _sorted_by(_conform("users", self.users), "user_id")
        self.events = _conform("events", self.events)
        self.requests = _conform("requests", self.requests)
        self.candidates = _conform("candidates", self.candidates, self.meta)
        request_ids, wanted = self.requests["request_id"], self.candidates["request_id"]
        # Candidates must follow request row order; re-group them (stably) if they do not.
        rows, found = _lookup(request_ids, wanted, sorter=np.argsort(request_ids, kind="stable"))
        if not found.all():
            raise ValueError("candidates refer to request ids absent from the requests table")
        if np.any(np.diff(rows) < 0):
            regroup = np.argsort(rows, kind="stable")
            self.candidates = {k: v[regroup] for k, v in self.candidates.items()}
            rows = rows[regroup]
        counts = np.bincount(rows, minlength=len(request_ids))
        self.candidate_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # -- sizes and lookups ------------------------------------------------------------------

    @property
    def n_requests(self) -> int:
        return len(self.requests["request_id"])

    @property
    def actions(self) -> tuple[str, ...]:
        """The event vocabulary: ``events.parquet``'s action values index it."""
        return meta_actions(self.meta)

    @property
    def objectives(self) -> tuple[str, ...]:
        """Impression, then the other actions: the label and probability columns' order."""
        return objectives_of(self.actions)

    @property
    def has_truth(self) -> bool:
        """Whether candidates carry ground-truth probabilities (synthetic worlds do)."""
        return bool(self.meta.get("has_truth", False))

    @property
    def cardinalities(self) -> dict[str, Any]:
        return dict(self.meta["cardinalities"])

    def item_index(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``items`` for raw ids: (rows, found) with rows clipped where not found."""
        return _lookup(self.items["item_id"], item_ids)

    def user_index(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``users`` for raw ids: (rows, found) with rows clipped where not found."""
        return _lookup(self.users["user_id"], user_ids)

    def candidate_rows(self, request_row: int) -> slice:
        """The candidate-table rows of one request row."""
        return slice(
            int(self.candidate_offsets[request_row]), int(self.candidate_offsets[request_row + 1])
        )

    def history_rows(self, request_row: int, max_history: int | None = None) -> slice:
        """Event-table rows of one request's history, keeping the most recent ``max_history``."""
        start = int(self.requests["history_start"][request_row])
        end = int(self.requests["history_end"][request_row])
        if max_history is not None:
            start = max(start, end - max_history)
        return slice(start, end)

    def features(self, spec: FeatureSpec) -> _Features:
        """Feature rows for ``spec``, computed once per spec (a numpy gather per table)."""
        cached = self._features.get(spec)
        if cached is None:
            cached = self._features[spec] = self._featurise(spec)
        return cached

    def _featurise(self, spec: FeatureSpec) -> _Features:
        item_rows = spec.item_rows({n: self.items[n] for n in spec.item_names if n in self.items})
        user_rows = spec.user_rows({n: self.users[n] for n in spec.user_names if n in self.users})
        labels = np.stack([self.candidates[c] for c in label_columns(self.objectives)], axis=1)
        labels = labels.astype(np.float32)
        return _Features(
            item_rows=item_rows,
            user_rows=user_rows,
            event_item_rows=_item_rows_for(self, spec, item_rows, self.events["item_id"]),
            candidate_item_rows=_item_rows_for(self, spec, item_rows, self.candidates["item_id"]),
            request_user_rows=_user_rows_for(self, spec, user_rows, self.requests["user_id"]),
            labels=labels,
        )


def _sorted_by(table: Table, key: str) -> Table:
    values = table[key]
    if len(values) and np.any(np.diff(values) <= 0):
        order = np.argsort(values, kind="stable")
        table = {k: v[order] for k, v in table.items()}
        if np.any(np.diff(table[key]) == 0):
            raise ValueError(f"duplicate {key} values")
    return table


def _lookup(
    ids_in_table: np.ndarray, ids: np.ndarray, sorter: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Table rows of ``ids`` (table ids sorted, or ordered by ``sorter``): (rows, found)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids_in_table) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    position = np.searchsorted(ids_in_table, ids, sorter=sorter)
    position = np.minimum(position, len(ids_in_table) - 1)
    rows = position if sorter is None else sorter[position]
    return rows, ids_in_table[rows] == ids


def _item_rows_for(
    world: World, spec: FeatureSpec, item_rows: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    """(len(ids), F_item): catalogue rows, and id-only rows (attributes OOV) for unknown ids."""
    rows, found = world.item_index(ids)
    out = item_rows[rows]
    if not found.all():
        out[~found] = spec.item_rows({"item_id": ids[~found]})
    return out


def _user_rows_for(
    world: World, spec: FeatureSpec, user_rows: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    rows, found = world.user_index(ids)
    out = user_rows[rows]
    if not found.all():
        out[~found] = spec.user_rows({"user_id": ids[~found]})
    return out


# -- reading and writing ------------------------------------------------------------------


class WorldWriter:
    """Writes a world directory; events may arrive in chunks, one Parquet row group each.

    The large synthetic preset streams its events through :meth:`write_events` and never holds
    them all; :func:`save_world` is the same writer fed whole tables.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._events: pq.ParquetWriter | None = None
        self.n_events = 0

    def write_events(self, events: Table) -> None:
        """Append events (already sorted: users in id order across calls, then time)."""
        table = _arrow(_conform("events", events))
        if self._events is None:
            self._events = pq.ParquetWriter(self.path / TABLE_FILES["events"], table.schema)
        self._events.write_table(table)
        self.n_events += table.num_rows

    def finish(
        self,
        *,
        items: Table,
        users: Table,
        requests: Table,
        candidates: Table,
        meta: dict[str, Any],
    ) -> None:
        """Write the remaining tables and ``world.json``; closes the events file."""
        if self._events is None:
            self.write_events(
                {name: np.zeros(0, dtype=dt) for name, dt in SCHEMAS["events"].items()}
            )
        assert self._events is not None
        self._events.close()
        tables = {"items": items, "users": users, "requests": requests, "candidates": candidates}
        for name, table in tables.items():
            pq.write_table(_arrow(_conform(name, table, meta)), self.path / TABLE_FILES[name])
        meta = {**meta, "format_version": FORMAT_VERSION}
        (self.path / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_world(world: World, path: Path) -> None:
    """Write ``world`` as a world directory at ``path`` (created if needed)."""
    writer = WorldWriter(path)
    writer.write_events(world.events)
    writer.finish(
        items=world.items,
        users=world.users,
        requests=world.requests,
        candidates=world.candidates,
        meta=world.meta,
    )


def _read_table(path: Path) -> Table:
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def world_fingerprint(path: Path) -> str | None:
    """SHA-256 of a world directory's files (``world.json`` and every table), or None where
    there is no world on disk. A run records the fingerprint of the world it was trained on, so
    a world generated again at the same path (another generator, another preset) never passes
    for the one the run saw."""
    path = Path(path)
    files = [path / "world.json", *(path / f for f in TABLE_FILES.values())]
    if not all(f.is_file() for f in files):
        return None
    stamps = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _fingerprint(stamps)


@functools.lru_cache(maxsize=32)
def _fingerprint(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed on each file's (path, mtime, size): hashed once per version of the files."""
    digest = hashlib.sha256()
    for name, _, _ in stamps:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_world(path: Path) -> World:
    """Read a world directory written by :class:`WorldWriter` / :func:`save_world`."""
    path = Path(path)
    if not (path / "world.json").is_file():
        raise FileNotFoundError(
            f"no world at {path}: world.json is missing "
            "(generate one with `python -m model.world --preset small --seed 0 --out DIR`)"
        )
    meta = json.loads((path / "world.json").read_text())
    tables = {name: _read_table(path / file) for name, file in TABLE_FILES.items()}
    world = World(meta=meta, path=path, **tables)
    validate_world(world)
    return world


def validate_world(world: World) -> None:
    """Check the format's invariants; raise ``ValueError`` naming the first one broken."""
    ev, rq = world.events, world.requests
    users, times = ev["user_id"], ev["timestamp"]
    same_user = users[1:] == users[:-1]
    if np.any(np.diff(users) < 0):
        raise ValueError("events are not sorted by user_id")
    if np.any(same_user & (np.diff(times) <= 0)):
        raise ValueError("event timestamps are not strictly increasing per user")
    n_actions = len(world.actions)
    if not np.all(ev["action"] >= 0) or not np.all(ev["action"] < n_actions):
        raise ValueError(f"event actions outside 0..{n_actions - 1} ({list(world.actions)})")
    if np.any(np.diff(rq["request_time"]) < 0):
        raise ValueError("requests are not in request_time order")
    start, end = rq["history_start"], rq["history_end"]
    if np.any(start > end) or np.any(start < 0) or np.any(end > len(users)):
        raise ValueError("request history ranges fall outside the events table")
    inside = end > start
    if np.any(users[start[inside]] != rq["user_id"][inside]) or np.any(
        users[end[inside] - 1] != rq["user_id"][inside]
    ):
        raise ValueError("a request's history range holds another user's events")
    if np.any(times[end[inside] - 1] >= rq["request_time"][inside]):
        raise ValueError("a request's history holds events at or after its request_time")
    after = end < len(users)
    nxt = end[after]
    if np.any((users[nxt] == rq["user_id"][after]) & (times[nxt] < rq["request_time"][after])):
        raise ValueError("a request's history range stops before the last event preceding it")


# -- feature spec, request stream, batches ------------------------------------------------


def spec_for_world(world: World, id_dim: int = 16, attribute_dim: int = 8) -> FeatureSpec:
    """The feature spec sized from ``world.json`` cardinalities.

    Every item, author and user of the world's tables gets an embedding row of its own (a
    hashed row shared by two items would blend them); ids outside the tables hash into a
    quarter as many buckets again, so an id the model never saw still has a stable row.
    """
    card = world.cardinalities
    items, users = world.items, world.users
    if "item_attributes" in world.meta:
        return _declared_spec(world, id_dim, attribute_dim)
    spec = default_spec(
        n_categories=int(card["n_categories"]),
        n_authors=_unseen_buckets(int(card["n_authors"])),
        item_buckets=_unseen_buckets(int(card["n_items"])),
        user_buckets=_unseen_buckets(int(card["n_users"])),
        profile_cardinalities={k: int(v) for k, v in card["profile_cardinalities"].items()},
        id_dim=id_dim,
        attribute_dim=attribute_dim,
        item_ids=items["item_id"],
        user_ids=users["user_id"],
        author_ids=items["author"],
    )
    return replace(spec, actions=world.actions)


def _declared_spec(world: World, id_dim: int, attribute_dim: int) -> FeatureSpec:
    """A prepared log's spec: item id, then the item attributes ``world.json`` declares (each a
    vocabulary of its recorded cardinality, in declared order), user id and no profile."""
    # A list, not a mapping: world.json is written with sorted keys, and the order is the spec's.
    attributes = {str(a["name"]): int(a["cardinality"]) for a in world.meta["item_attributes"]}
    n_items, n_users = len(world.items["item_id"]), len(world.users["user_id"])
    return FeatureSpec(
        item_fields=(
            Field(
                "item_id",
                "hashed",
                _unseen_buckets(n_items),
                id_dim,
                known_id_tuple(world.items["item_id"]),
            ),
            *(Field(name, "vocab", card, attribute_dim) for name, card in attributes.items()),
        ),
        user_fields=(
            Field(
                "user_id",
                "hashed",
                _unseen_buckets(n_users),
                id_dim,
                known_id_tuple(world.users["user_id"]),
            ),
        ),
        actions=world.actions,
    )


def _unseen_buckets(known: int) -> int:
    """Hash buckets for ids outside a table of ``known`` ids."""
    return max(16, known // 4)


def _request_rows(world: World, request_rows: np.ndarray | range | None) -> np.ndarray:
    if request_rows is None:
        return np.arange(world.n_requests)
    return np.asarray(request_rows, dtype=np.int64)


def _joint_truth(world: World, candidate_rows: np.ndarray | slice) -> np.ndarray:
    """(n, n_objectives) float64: p_impression, then joint p_impression · p(action | imp)."""
    columns = probability_columns(world.objectives)
    p = np.stack([world.candidates[c][candidate_rows] for c in columns], axis=1)
    p = p.astype(np.float64)
    p[:, 1:] *= p[:, :1]
    return p


def request_truth(world: World, request_row: int) -> np.ndarray:
    """(M, n_objectives) float32 true probabilities of the request's labels.

    Column 0 is p(impression); column 1.. are the *joint* p(impression) · p(action | impression),
    i.e. each column is the probability of the label in the same column of ``Request.labels``
    (the quantity an ESMM model predicts as p_imp · p_a). NaN where the world has no truth.
    """
    return _joint_truth(world, world.candidate_rows(request_row)).astype(np.float32)


@overload
def request_stream(
    world: World,
    spec: FeatureSpec,
    max_history: int | None = ...,
    *,
    with_truth: Literal[False] = ...,
    request_rows: np.ndarray | range | None = ...,
) -> Iterator[Request]: ...


@overload
def request_stream(
    world: World,
    spec: FeatureSpec,
    max_history: int | None = ...,
    *,
    with_truth: Literal[True],
    request_rows: np.ndarray | range | None = ...,
) -> Iterator[tuple[Request, np.ndarray]]: ...


def request_stream(
    world: World,
    spec: FeatureSpec,
    max_history: int | None = None,
    *,
    with_truth: bool = False,
    request_rows: np.ndarray | range | None = None,
) -> Iterator[Request] | Iterator[tuple[Request, np.ndarray]]:
    """Featurised requests in request_time order (or in the order of ``request_rows``).

    Each request's events are its user's events before ``request_time``, oldest first; with
    ``max_history`` only the most recent ``max_history`` are kept. Labels are (M, n_objectives)
    float32 in the world's objective order. With ``with_truth`` yields ``(request, truth)`` with
    ``truth`` as in :func:`request_truth`.
    """
    features = world.features(spec)
    rows = _request_rows(world, request_rows)
    times, actions = world.events["timestamp"], world.events["action"]
    request_times = world.requests["request_time"]

    def generate() -> Iterator[Any]:
        for r in rows:
            history = world.history_rows(int(r), max_history)
            cands = world.candidate_rows(int(r))
            event_times = times[history]
            request = Request(
                user=features.request_user_rows[r],
                candidates=features.candidate_item_rows[cands],
                events=spec.event_rows(
                    features.event_item_rows[history], actions[history], event_times
                ),
                event_times=event_times,
                request_time=float(request_times[r]),
                labels=features.labels[cands],
            )
            yield (request, request_truth(world, int(r))) if with_truth else request

    return generate()


@overload
def batches(
    world: World,
    spec: FeatureSpec,
    batch_size: int,
    max_history: int | None = ...,
    *,
    with_truth: Literal[False] = ...,
    request_rows: np.ndarray | range | None = ...,
) -> Iterator[Batch]: ...


@overload
def batches(
    world: World,
    spec: FeatureSpec,
    batch_size: int,
    max_history: int | None = ...,
    *,
    with_truth: Literal[True],
    request_rows: np.ndarray | range | None = ...,
) -> Iterator[tuple[Batch, np.ndarray]]: ...


def batches(
    world: World,
    spec: FeatureSpec,
    batch_size: int,
    max_history: int | None = None,
    *,
    with_truth: bool = False,
    request_rows: np.ndarray | range | None = None,
) -> Iterator[Batch] | Iterator[tuple[Batch, np.ndarray]]:
    """Consecutive requests of :func:`request_stream` collated into batches (no shuffling).

    Streaming order is the evaluation protocol: each batch is scored before it is trained on.
    With ``with_truth`` yields ``(batch, truth)``, ``truth`` (B, M, 4) float32 laid out like
    ``batch.labels`` (p_impression, then joint p_imp · p_action; zero on padded candidates).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n_event_fields, n_item_fields = len(spec.event_fields), len(spec.item_fields)
    n_objectives = len(world.objectives)

    def generate() -> Iterator[Any]:
        pending: list[tuple[Request, np.ndarray]] = []
        for request, truth in request_stream(
            world, spec, max_history, with_truth=True, request_rows=request_rows
        ):
            pending.append((request, truth))
            if len(pending) == batch_size:
                yield _collate(pending, n_event_fields, n_item_fields, n_objectives, with_truth)
                pending = []
        if pending:
            yield _collate(pending, n_event_fields, n_item_fields, n_objectives, with_truth)

    return generate()


def _collate(
    pending: list[tuple[Request, np.ndarray]],
    n_event_fields: int,
    n_item_fields: int,
    n_objectives: int,
    with_truth: bool,
) -> Batch | tuple[Batch, np.ndarray]:
    batch = collate([r for r, _ in pending], n_event_fields, n_item_fields)
    if not with_truth:
        return batch
    truth = np.zeros((batch.size, batch.candidates.shape[1], n_objectives), dtype=np.float32)
    for i, (_, t) in enumerate(pending):
        truth[i, : len(t)] = t
    return batch, truth


# -- evaluation helpers ---------------------------------------------------------------------


def oracle_auc(world: World, request_rows: np.ndarray | range | None = None) -> dict[str, float]:
    """AUC per objective of the true probabilities: the ceiling for any model on this world.

    Impression is scored by p_impression, each action by the joint p_impression · p_action,
    against the labels of every candidate of the chosen requests.
    """
    if not world.has_truth:
        raise ValueError("this world has no ground-truth probabilities (has_truth is false)")
    rows = _request_rows(world, request_rows)
    offsets = world.candidate_offsets
    cand = np.concatenate(
        [np.zeros(0, dtype=np.int64), *(np.arange(offsets[r], offsets[r + 1]) for r in rows)]
    )
    labels = np.stack([world.candidates[c][cand] for c in label_columns(world.objectives)], axis=1)
    return objective_aucs(labels, _joint_truth(world, cand), world.objectives)


# -- catalogue and histories for the exporter and the service ------------------------------


def observable_columns(world: World, table: Literal["items", "users"]) -> list[str]:
    """Columns a model may see (``world.json["observable"]``); latent truth columns excluded."""
    observable = world.meta.get("observable", {}).get(table)
    if observable is None:
        return list(schema(table, world.meta))
    return [c for c in observable if c in getattr(world, table)]


def item_catalogue(world: World) -> dict[str, np.ndarray]:
    """Item ids and their observable raw attributes (``item_id``, ``category``, ``author``...)."""
    return {c: world.items[c] for c in observable_columns(world, "items")}


def user_profiles(world: World) -> dict[str, np.ndarray]:
    """User ids and their observable profile columns (``user_id``, ``age_group``, ...)."""
    return {c: world.users[c] for c in observable_columns(world, "users")}


def user_history(world: World, user_id: int, before: float | None = None) -> dict[str, np.ndarray]:
    """A user's raw events, oldest first: ``item_id``, ``action``, ``timestamp`` arrays.

    With ``before`` only events with ``timestamp < before`` (what a request at that time sees).
    """
    users = world.events["user_id"]
    lo, hi = np.searchsorted(users, [user_id, user_id + 1])
    if before is not None:
        hi = lo + int(np.searchsorted(world.events["timestamp"][lo:hi], before))
    return {c: world.events[c][lo:hi] for c in ("item_id", "action", "timestamp")}
