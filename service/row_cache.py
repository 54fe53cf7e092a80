"""A bounded cache of feature rows by id, looked up in bulk with numpy operations only.

The live catalogue keeps the ids outside the model's catalogue here (items added through
``PUT /items`` and negative entries for unknown ids). A lookup of M ids must not cost a Python
object or a dictionary lookup per id: at M = 1,000 that loop cost more than the rest of the
featurisation together.

Layout: the entries live in slots of flat arrays (id, row, until, known, live), written in order:
a write appends at the end, so slot order is write order, and the oldest written live entry is
the first live slot. An id written again gets a new slot and its old one is marked dead, so an id
has at most one live slot. The arrays hold ``2 · capacity`` slots; when a write does not fit, the
live entries are moved to the front in order (compaction: O(capacity), at most once per
``capacity`` ids written).

Index: two sorted arrays of (id, slot), looked up with ``searchsorted``:

* main: the live slots below ``_main_end``, sorted when rebuilt: O(L log L) for L live entries,
  once per ``RECENT_LIMIT`` ids written (and at each compaction);
* recent: the live slots from ``_main_end`` on, sorted again at each write: O(R log R), R below
  ``RECENT_LIMIT``.

A lookup of M ids costs two ``searchsorted`` (O(M log L)) and a few gathers; a slot found dead
(evicted, or its id written again since the index was built) is a miss. Per id written the
amortised cost is O(log L) plus the recent sort. A numpy open-addressing hash table would look up
in O(M), but needs probe loops for batch inserts with collisions and tombstones for deletion; at
M = 1,000 the ``searchsorted`` is a few tens of microseconds, so the simpler index wins.
"""

from __future__ import annotations

import numpy as np

RECENT_LIMIT = 4096
"""Ids written since the main index was built beyond which it is rebuilt: bounds the sort of the
recent index at each write (about 0.2 ms) and spreads the main sort (a few ms at 50,000 entries)
over as many ids written."""


class RowCache:
    """At most ``capacity`` entries ``id → (row (width,) int64, until, known)``, the oldest
    written dropped first."""

    def __init__(self, width: int, capacity: int) -> None:
        self.capacity = capacity
        size = 2 * max(capacity, 1)
        self.ids = np.zeros(size, dtype=np.int64)
        self.rows = np.zeros((size, width), dtype=np.int64)  # (S, width)
        self.until = np.zeros(size)  # (S,) clock time the entry holds until
        self.known = np.zeros(size, dtype=bool)  # (S,)
        self._live = np.zeros(size, dtype=bool)  # (S,) the slot holds its id's entry
        self._end = 0
        """Slots [0, end) have been written since the last compaction."""
        self._oldest = 0
        """No live slot below it: where the search for the oldest entry starts."""
        self._count = 0
        self._main_end = 0
        self._main = _empty_index()
        self._recent = _empty_index()

    def __len__(self) -> int:
        return self._count

    def find(self, ids: np.ndarray) -> np.ndarray:
        """(n,) the slot of each of ``ids`` (n,), repeats allowed, or -1 where not cached."""
        slot = np.full(ids.size, -1, dtype=np.int64)
        for index_ids, index_slots in (self._main, self._recent):
            if not index_ids.size:
                continue
            # searchsorted returns the length for ids above the largest: clip to compare.
            position = np.minimum(np.searchsorted(index_ids, ids), index_ids.size - 1)
            found = index_slots[position]
            hit = (index_ids[position] == ids) & self._live[found]
            slot = np.where(hit, found, slot)
        return slot

    def write(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        known: np.ndarray,
        until: float,
        newer: bool = False,
    ) -> None:
        """Cache ``rows`` (n, width) and ``known`` (n,) of unique ``ids`` (n,) until ``until``,
        each id becoming the newest written; with ``newer``, an id whose entry already holds as
        long keeps that entry (a concurrent write got there first), as the newest written too."""
        if self.capacity <= 0 or not ids.size:
            return
        untils = np.full(ids.size, until)
        slot = self.find(ids)
        cached = slot >= 0
        if newer:
            kept = cached.copy()
            kept[cached] = self.until[slot[cached]] >= until
            if kept.any():
                rows, known = rows.copy(), known.copy()
                rows[kept], known[kept] = self.rows[slot[kept]], self.known[slot[kept]]
                untils[kept] = self.until[slot[kept]]
        self._live[slot[cached]] = False
        self._count -= int(np.count_nonzero(cached))
        # The first ones of a batch larger than the cache would be dropped at once.
        keep = slice(max(0, ids.size - self.capacity), None)
        ids, rows, known, untils = ids[keep], rows[keep], known[keep], untils[keep]
        if self._end + ids.size > self.ids.size:
            self._compact()
        written = slice(self._end, self._end + ids.size)
        self.ids[written], self.rows[written] = ids, rows
        self.known[written], self.until[written] = known, untils
        self._live[written] = True
        self._end += ids.size
        self._count += ids.size
        self._evict(self._count - self.capacity)
        if self._end - self._main_end > RECENT_LIMIT:
            self._main, self._main_end = self._index(0, self._end), self._end
        self._recent = self._index(self._main_end, self._end)

    def _evict(self, excess: int) -> None:
        """Drop the ``excess`` oldest written live entries."""
        while excess > 0:
            # Most slots past the oldest are live: look a little beyond the excess at a time.
            stop = min(self._end, self._oldest + 2 * excess + 64)
            victims = np.flatnonzero(self._live[self._oldest : stop])[:excess] + self._oldest
            self._live[victims] = False
            self._count -= victims.size
            excess -= victims.size
            self._oldest = int(victims[-1]) + 1 if victims.size else stop

    def _compact(self) -> None:
        """Move the live entries to the front, in write order, and index them anew."""
        live = np.flatnonzero(self._live[: self._end])
        n = live.size
        for array in (self.ids, self.rows, self.known, self.until):
            array[:n] = array[live]
        self._live[:] = False
        self._live[:n] = True
        self._end, self._oldest = n, 0
        self._main, self._main_end = self._index(0, n), n
        self._recent = _empty_index()

    def _index(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, their slots) of the live slots in [start, stop)."""
        slots = np.flatnonzero(self._live[start:stop]) + start
        ids = self.ids[slots]
        order = np.argsort(ids)
        return ids[order], slots[order]


def _empty_index() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
