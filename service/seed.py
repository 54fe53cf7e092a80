"""First run: preload the store with a demo world's histories and profiles.

Vectorised: the events are sorted by (user, time) once, packed into log records in one numpy
pass, and cut into per-user byte strings; the store receives them in a few bulk calls, never one
await per event. Users that already have a log are left alone, so restarting is harmless.
Seeded events carry no event ids (a world has none), so /events can never duplicate them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from model.data import TABLE_FILES, world_actions
from service.stores.base import SeedHistories
from service.stores.records import pack_records

EVENT_COLUMNS = ("user_id", "item_id", "action", "timestamp")


def load_seed(
    world_dir: Path, actions: tuple[str, ...], profile_fields: tuple[str, ...]
) -> SeedHistories:
    """Histories of ``world_dir/events.parquet`` and profiles of ``users.parquet``.

    A world stores actions as indices into its own vocabulary (``world.json``'s ``actions``, the
    default vocabulary where it declares none); they are re-indexed into the store's vocabulary
    ``actions`` by name (names it lacks become -1, scored as OOV).
    Only profile columns in ``profile_fields`` (the model's user fields) are kept.
    """
    events = pq.read_table(world_dir / TABLE_FILES["events"], columns=list(EVENT_COLUMNS))
    user_ids = np.asarray(events.column("user_id").to_numpy(), dtype=np.int64)
    item_ids = np.asarray(events.column("item_id").to_numpy(), dtype=np.int64)
    stored = np.asarray(events.column("action").to_numpy(), dtype=np.int64)
    timestamps = np.asarray(events.column("timestamp").to_numpy(), dtype=np.float64)

    names = world_actions(world_dir)
    to_model = np.array([actions.index(a) if a in actions else -1 for a in names], np.int64)
    valid = (stored >= 0) & (stored < len(names))
    model_actions = np.where(valid, to_model[np.clip(stored, 0, len(names) - 1)], -1)

    order = np.lexsort((timestamps, user_ids))
    user_ids = user_ids[order]
    records = pack_records(item_ids[order], model_actions[order], timestamps[order])
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if user_ids.size else None
    starts = starts if starts is not None else np.zeros(0, dtype=np.int64)
    bounds = np.r_[starts, user_ids.size].astype(np.int64)
    return SeedHistories(
        user_ids=user_ids[starts],
        bounds=bounds,
        records=records,
        profiles=load_profiles(world_dir, profile_fields),
    )


def load_profiles(world_dir: Path, profile_fields: tuple[str, ...]) -> dict[int, dict[str, int]]:
    path = world_dir / TABLE_FILES["users"]
    if not path.is_file():
        return {}
    available = pq.read_schema(path).names
    wanted = [c for c in profile_fields if c in available and c != "user_id"]
    if "user_id" not in available or not wanted:
        return {}
    table = pq.read_table(path, columns=["user_id", *wanted])
    ids = table.column("user_id").to_numpy().tolist()
    columns = [table.column(c).fill_null(-1).to_numpy().tolist() for c in wanted]
    return {
        int(user_id): {name: int(values[i]) for name, values in zip(wanted, columns, strict=True)}
        for i, user_id in enumerate(ids)
    }
