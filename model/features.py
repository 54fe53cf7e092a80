"""The one feature specification shared by embeddings, batches, export and the service.

Every categorical field maps a raw integer value to an embedding row:

* row 0 is padding (a zero vector that never trains),
* row 1 is the out-of-vocabulary bucket (unknown ids, values outside the vocabulary),
* rows 2.. are known values.

``hashed`` fields (ids) give each id of the catalogue known when the model is built
(``known_ids``) a row of its own, and spread any other non-negative 64-bit integer over their
buckets with a fixed integer hash, so an id the model never saw still gets a stable row; ``vocab``
fields (category, action, profile attributes) keep values in ``[0, cardinality)`` and send the
rest to OOV.

Behaviour events carry the item's fields, the action type and *absolute* time features only
(hour of day, day of week), never request-relative ones: keys and values must be functions of the
event alone so that a cached state stays valid (DESIGN §2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from itertools import pairwise
from typing import Literal

import numpy as np

PADDING_INDEX = 0
OOV_INDEX = 1
RESERVED_ROWS = 2

ACTIONS: tuple[str, ...] = ("impression", "click", "long_view", "like")
"""The default behaviour-event vocabulary, in index order: the synthetic worlds' and
MovieLens's, and what a world, checkpoint or artefact that declares none was made with (they
predate declared vocabularies and keep loading). A world declares its own in ``world.json``
(``"actions"``); see :func:`check_actions`."""

OBJECTIVES: tuple[str, ...] = ACTIONS
"""The default model outputs, in column order: p(impression) then p(action | impression) per
action. Every action is an objective (:func:`objectives_of`)."""


def check_actions(actions: Sequence[str]) -> tuple[str, ...]:
    """A vocabulary as the model needs it: ``impression`` (the ESMM base every other action is
    conditioned on) and at least one more action, names unique and non-empty, in any order
    (the order is the events' action indices; stores map vocabularies by name)."""
    names = tuple(str(a) for a in actions)
    if "impression" not in names or len(names) < 2:
        raise ValueError(f"actions {list(names)}: need 'impression' and at least one more action")
    if len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise ValueError(f"actions {list(names)}: names must be unique and non-empty")
    return names


def objectives_of(actions: Sequence[str]) -> tuple[str, ...]:
    """The output columns of a vocabulary: impression, then its other actions in order."""
    return ("impression", *(a for a in actions if a != "impression"))


DEFAULT_MAX_HISTORY = 1000
"""The history window: training keeps each request's most recent events, and the service keeps
the same number per user (the artefact's manifest carries the window it was trained with)."""

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Field:
    """One categorical input: how raw values become embedding rows."""

    name: str
    kind: Literal["hashed", "vocab"]
    cardinality: int
    """Buckets for ``hashed`` fields (beyond ``known_ids``), known values for ``vocab`` fields
    (OOV and padding extra)."""
    dim: int
    known_ids: tuple[int, ...] = field(default=(), repr=False)
    """``hashed`` fields: the ids that get rows of their own (rows 2.., in increasing id order),
    so no two of them share a row; every other id hashes into the ``cardinality`` buckets after
    them."""

    def __post_init__(self) -> None:
        # Checkpoints and manifests store the ids as a JSON list; the spec is hashable.
        known = tuple(int(i) for i in self.known_ids)
        object.__setattr__(self, "known_ids", known)
        if known and self.kind != "hashed":
            raise ValueError(f"field {self.name}: only hashed fields take known_ids")
        if any(b <= a for a, b in pairwise(known)):
            raise ValueError(f"field {self.name}: known_ids must be increasing and unique")

    @property
    def rows(self) -> int:
        return self.cardinality + len(self.known_ids) + RESERVED_ROWS

    @cached_property
    def _known(self) -> np.ndarray:
        return np.asarray(self.known_ids, dtype=np.int64)

    def index(self, raw: np.ndarray) -> np.ndarray:
        """Embedding rows for raw non-negative int64 values (negative values map to OOV)."""
        raw = np.asarray(raw, dtype=np.int64)
        if self.kind == "hashed":
            first_bucket = RESERVED_ROWS + len(self.known_ids)
            buckets = (mix64(raw) % np.uint64(self.cardinality)).astype(np.int64) + first_bucket
            known = self._known
            if len(known):
                position = np.minimum(np.searchsorted(known, raw), len(known) - 1)
                buckets = np.where(known[position] == raw, position + RESERVED_ROWS, buckets)
            return np.where(raw >= 0, buckets, OOV_INDEX)
        known_value = (raw >= 0) & (raw < self.cardinality)
        return np.where(known_value, raw + RESERVED_ROWS, OOV_INDEX)


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fixed, platform-independent hash of int64 ids."""
    x = np.asarray(values, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(
            0xFFFFFFFFFFFFFFFF
        )
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(
            0xFFFFFFFFFFFFFFFF
        )
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class FeatureSpec:
    """Item, event and user fields. Column order of every feature matrix follows these tuples."""

    item_fields: tuple[Field, ...]
    user_fields: tuple[Field, ...]
    action_dim: int = 8
    time_dim: int = 4
    actions: tuple[str, ...] = ACTIONS
    event_time_fields: tuple[Field, ...] = field(init=False)

    def __post_init__(self) -> None:
        time_fields = (
            Field("hour_of_day", "vocab", 24, self.time_dim),
            Field("day_of_week", "vocab", 7, self.time_dim),
        )
        object.__setattr__(self, "event_time_fields", time_fields)
        object.__setattr__(self, "actions", check_actions(self.actions))

    @property
    def objectives(self) -> tuple[str, ...]:
        """Output columns: p(impression), then p(action | impression) per other action."""
        return objectives_of(self.actions)

    @property
    def action_field(self) -> Field:
        return Field("action", "vocab", len(self.actions), self.action_dim)

    @property
    def event_fields(self) -> tuple[Field, ...]:
        """Item fields, then action, then absolute-time fields."""
        return (*self.item_fields, self.action_field, *self.event_time_fields)

    @property
    def item_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.item_fields)

    @property
    def user_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.user_fields)

    @property
    def item_dim(self) -> int:
        return sum(f.dim for f in self.item_fields)

    @property
    def event_dim(self) -> int:
        return sum(f.dim for f in self.event_fields)

    @property
    def user_dim(self) -> int:
        return sum(f.dim for f in self.user_fields)

    def action_index(self, action: str) -> int:
        """Raw action value of a name; raises ``KeyError`` naming the vocabulary otherwise."""
        try:
            return self.actions.index(action)
        except ValueError:
            raise KeyError(
                f"unknown action {action!r}; expected one of {list(self.actions)}"
            ) from None

    # -- featurisation: raw columns -> int64 embedding rows ---------------------------------

    def item_rows(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """(M, F_item) rows from raw item columns named like ``item_fields`` (missing -> OOV)."""
        return _rows(self.item_fields, columns)

    def user_rows(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """(B, F_user) rows from raw user columns named like ``user_fields`` (missing -> OOV)."""
        return _rows(self.user_fields, columns)

    def event_rows(
        self, item_rows: np.ndarray, actions: np.ndarray, timestamps: np.ndarray
    ) -> np.ndarray:
        """(N, F_event) rows: the events' item rows, action and time-of-day/week rows.

        ``item_rows`` is (N, F_item) as from :meth:`item_rows`; ``actions`` raw action values;
        ``timestamps`` unix seconds (UTC).
        """
        timestamps = np.asarray(timestamps, dtype=np.float64)
        item_rows = np.asarray(item_rows, dtype=np.int64).reshape(
            len(timestamps), len(self.item_fields)
        )
        seconds = np.floor(timestamps).astype(np.int64)
        hour = (seconds // int(SECONDS_PER_HOUR)) % 24
        # 1970-01-01 was a Thursday: shift so that Monday is 0.
        weekday = (seconds // int(SECONDS_PER_DAY) + 3) % 7
        hour_field, weekday_field = self.event_time_fields
        return np.concatenate(
            [
                item_rows,
                self.action_field.index(np.asarray(actions, dtype=np.int64))[:, None],
                hour_field.index(hour)[:, None],
                weekday_field.index(weekday)[:, None],
            ],
            axis=1,
        )

    # -- (de)serialisation for checkpoints and manifests ------------------------------------

    def to_dict(self) -> dict[str, object]:
        return {
            "item_fields": [_field_dict(f) for f in self.item_fields],
            "user_fields": [_field_dict(f) for f in self.user_fields],
            "action_dim": self.action_dim,
            "time_dim": self.time_dim,
            "actions": list(self.actions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FeatureSpec:
        def fields(key: str) -> tuple[Field, ...]:
            raw = data[key]
            assert isinstance(raw, list)
            return tuple(Field(**f) for f in raw)

        action_dim = data.get("action_dim", 8)
        time_dim = data.get("time_dim", 4)
        actions = data.get("actions", list(ACTIONS))  # specs saved before vocabularies
        assert isinstance(action_dim, int) and isinstance(time_dim, int)
        assert isinstance(actions, list)
        return cls(
            item_fields=fields("item_fields"),
            user_fields=fields("user_fields"),
            action_dim=action_dim,
            time_dim=time_dim,
            actions=tuple(str(a) for a in actions),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _field_dict(f: Field) -> dict[str, object]:
    """A field as plain data; ``known_ids`` only where there are some, so specs without them
    read as before."""
    data = asdict(f)
    if not f.known_ids:
        del data["known_ids"]
    else:
        data["known_ids"] = list(f.known_ids)
    return data


def _rows(fields: tuple[Field, ...], columns: dict[str, np.ndarray]) -> np.ndarray:
    lengths = {len(np.asarray(v)) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"feature columns differ in length: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    out = np.full((n, len(fields)), OOV_INDEX, dtype=np.int64)
    for i, f in enumerate(fields):
        if f.name in columns:
            out[:, i] = f.index(np.asarray(columns[f.name], dtype=np.int64))
    return out


MAX_KNOWN_IDS = 2_000_000
"""Past this many ids a field hashes all of them: a row per id would outgrow the table."""


def known_id_tuple(ids: Sequence[int] | np.ndarray | None) -> tuple[int, ...]:
    """The sorted unique ids that get rows of their own; none past :data:`MAX_KNOWN_IDS`."""
    if ids is None:
        return ()
    unique = np.unique(np.asarray(ids, dtype=np.int64))
    unique = unique[unique >= 0]
    if len(unique) > MAX_KNOWN_IDS:
        return ()
    return tuple(int(i) for i in unique)


def default_spec(
    n_categories: int = 64,
    n_authors: int = 4096,
    item_buckets: int = 100_000,
    user_buckets: int = 50_000,
    profile_cardinalities: dict[str, int] | None = None,
    id_dim: int = 16,
    attribute_dim: int = 8,
    item_ids: Sequence[int] | np.ndarray | None = None,
    user_ids: Sequence[int] | np.ndarray | None = None,
    author_ids: Sequence[int] | np.ndarray | None = None,
) -> FeatureSpec:
    """The spec the synthetic world and the demo model use; sizes come from the data.

    ``item_ids``, ``user_ids`` and ``author_ids``: the known catalogue, each id a row of its own
    (the buckets then hold only ids outside it); None hashes every id into the buckets.
    """
    profiles = profile_cardinalities or {"age_group": 8, "gender": 3, "region": 32}
    return FeatureSpec(
        item_fields=(
            Field("item_id", "hashed", item_buckets, id_dim, known_id_tuple(item_ids)),
            Field("category", "vocab", n_categories, attribute_dim),
            Field("author", "hashed", n_authors, attribute_dim, known_id_tuple(author_ids)),
        ),
        user_fields=(
            Field("user_id", "hashed", user_buckets, id_dim, known_id_tuple(user_ids)),
            *(Field(name, "vocab", card, attribute_dim) for name, card in profiles.items()),
        ),
    )
