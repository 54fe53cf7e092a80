"""The live item catalogue: the model's catalogue is the base, the store's item table overrides
and extends it, and a bounded in-process cache with a TTL keeps the hot path off the store.

Lookups are in bulk: the ids of a request that the cache cannot answer are fetched from the
store together (one round trip), the rest are answered locally. Two caches answer locally:

* ids of the base catalogue: arrays aligned with the catalogue (the row each id has now, and
  until when it holds without asking the store), so that a candidate set of base items whose
  entries are fresh costs one ``searchsorted`` and one gather, as without an item table;
* other ids (items added through ``PUT /items``, and ids nobody knows: a negative entry): a
  :class:`service.row_cache.RowCache` of at most ``capacity`` entries, the oldest written dropped
  first, looked up in bulk with ``searchsorted`` too (no Python work per id).

Staleness: an entry is used for ``ttl_seconds`` after it was fetched or written; an update made
through another worker or replica is seen by this one within ``ttl_seconds`` (the next lookup
after the entry expires fetches it). The worker that takes a ``PUT /items`` writes its own
cache at once. When the store fails or does not answer within ``lookup_budget_seconds``, a
lookup answers from the entries it has (expired ones included), else the base catalogue, else
OOV rows, and counts those ids as degraded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from model.catalogue import ID_COLUMN, MISSING_VALUE, Catalogue
from model.features import OOV_INDEX
from service.metrics import Metrics
from service.row_cache import RowCache
from service.stores.base import ItemAttributes, ItemsUnavailable, ItemTable, StoreError
from service.stores.records import EventLog

logger = logging.getLogger("service")

DEGRADED_LOG_INTERVAL_SECONDS = 10.0
LOOKUP_BACKOFF_SECONDS = 1.0
"""After a failed lookup, how long lookups answer from the cache alone: a store that is down
costs each worker one lookup budget a second, not one per request."""


@dataclass(frozen=True)
class ItemRows:
    """Feature rows of a list of item ids, in its order."""

    rows: np.ndarray  # (M, F_item) int64
    known: np.ndarray  # (M,) bool: the id is in the base catalogue or the item table
    oov_attribute: np.ndarray  # (M,) bool: known, and an attribute field is OOV


@dataclass(frozen=True)
class ItemReport:
    """How one upserted item featurises under the served model."""

    item_id: int
    oov_fields: list[str]
    """Attributes given with a value outside the field's vocabulary: that field is OOV."""
    missing_fields: list[str]
    """Fields of the model not given (or given as null): OOV too."""


class LiveCatalogue:
    def __init__(
        self,
        base: Catalogue,
        table: ItemTable,
        metrics: Metrics,
        ttl_seconds: float,
        capacity: int,
        lookup_budget_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.spec = base.spec
        self.table = table
        self.metrics = metrics
        self.ttl_seconds = ttl_seconds
        self.capacity = capacity
        self.lookup_budget_seconds = lookup_budget_seconds
        self.clock = clock
        self.attribute_names = tuple(n for n in self.spec.item_names if n != ID_COLUMN)
        """The fields PUT /items may set (the id field comes from the item's id)."""
        self._attribute_columns = np.array(
            [i for i, n in enumerate(self.spec.item_names) if n != ID_COLUMN], dtype=np.int64
        )
        self._oov_row = np.full(len(self.spec.item_fields), OOV_INDEX, dtype=np.int64)
        self._base_ids = np.asarray(base.item_ids)  # (K,) ascending
        self._base_rows = base.rows(self._base_ids)[0]  # (K, F_item): the model's rows
        self._rows = self._base_rows.copy()  # (K, F_item): each base id's row now
        self._until = np.zeros(len(self._base_ids))  # (K,) clock time the row holds until
        self._others = RowCache(len(self.spec.item_fields), capacity)
        self._degraded_logged_at = -DEGRADED_LOG_INTERVAL_SECONDS
        self._lookups_resume_at = -LOOKUP_BACKOFF_SECONDS
        """Clock time before which lookups do not ask the store (it failed just before)."""

    # -- featurisation of posted attributes -------------------------------------------------

    def featurise(
        self, items: Mapping[int, Mapping[str, int]]
    ) -> tuple[np.ndarray, list[ItemReport]]:
        """(n, F_item) rows of items given by raw attributes (names from
        :attr:`attribute_names`), and which fields of each went to OOV."""
        rows = self._attribute_rows(items)
        names = self.spec.item_names
        reports = []
        for item_id, attributes, row in zip(items.keys(), items.values(), rows, strict=True):
            oov = [names[j] for j in self._attribute_columns if row[j] == OOV_INDEX]
            reports.append(
                ItemReport(
                    item_id=item_id,
                    oov_fields=[n for n in oov if n in attributes],
                    missing_fields=[n for n in oov if n not in attributes],
                )
            )
        return rows, reports

    def _attribute_rows(
        self, items: Mapping[int, Mapping[str, int]], in_base: np.ndarray | None = None
    ) -> np.ndarray:
        """(n, F_item) rows of items given by raw attributes; a missing one is OOV, and so is
        the id of an item outside the model's catalogue: the model never learnt its id's
        embedding (a hashed id would borrow the row of whichever trained items share its
        bucket), while its attributes' embeddings are trained. ``in_base``: (n,) whether each
        id is in the base catalogue, when the caller knows."""
        n = len(items)
        ids = np.fromiter(items.keys(), dtype=np.int64, count=n)
        if in_base is None:
            _, in_base = self._base_positions(ids)
        columns = {ID_COLUMN: np.where(in_base, ids, MISSING_VALUE)} | {
            name: np.fromiter((a.get(name, MISSING_VALUE) for a in items.values()), np.int64, n)
            for name in self.attribute_names
        }
        return self.spec.item_rows(columns)

    async def put(self, items: Mapping[int, ItemAttributes]) -> list[ItemReport]:
        """Upsert items into the store (each id's attributes replaced) and into this worker's
        cache; raises :class:`StoreError` when the store does not take them."""
        rows, reports = self.featurise(items)
        await self.table.put_items(items)
        ids = np.fromiter(items.keys(), dtype=np.int64, count=len(items))
        self._remember(ids, rows, np.ones(len(ids), dtype=bool), self.clock() + self.ttl_seconds)
        return reports

    # -- lookups -------------------------------------------------------------------------------

    async def rows(self, item_ids: np.ndarray) -> ItemRows:
        """Rows of ``item_ids`` (M,), any order, repeats allowed: the cache's, and for the ids it
        cannot answer the store's, fetched in one round trip."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        now = self.clock()
        position, in_base = self._base_positions(ids)
        if len(self._base_ids):
            rows = np.where(in_base[:, None], self._rows[position], self._oov_row[None, :])
            fresh = in_base & (self._until[position] > now)
        else:
            rows = np.tile(self._oov_row, (ids.size, 1))
            fresh = np.zeros(ids.size, dtype=bool)
        known = in_base.copy()
        hits = int(np.count_nonzero(fresh))
        due = ~fresh & in_base  # base ids due for a check
        outside = np.flatnonzero(~in_base)
        if outside.size:
            slot = self._others.find(ids[outside])
            cached = slot >= 0
            # Expired entries answer too, until the store does (or when it fails).
            rows[outside[cached]] = self._others.rows[slot[cached]]
            known[outside[cached]] = self._others.known[slot[cached]]
            fresh_outside = cached.copy()
            fresh_outside[cached] = self._others.until[slot[cached]] > now
            hits += int(np.count_nonzero(fresh_outside))
            due[outside[~fresh_outside]] = True
        if hits < ids.size:
            await self._refresh(ids, np.flatnonzero(due), position, in_base, rows, known, now)
        self.metrics.item_cache.labels(outcome="hit").inc(hits)
        attributes = rows[:, self._attribute_columns]
        oov_attribute = known & (attributes == OOV_INDEX).any(axis=1)
        return ItemRows(rows, known, oov_attribute)

    async def with_item_rows(self, log: EventLog) -> EventLog:
        """``log`` with its events' item rows resolved now, through this catalogue: an event is
        folded with the features its item has when it is folded."""
        if len(log) == 0:
            return log
        return replace(log, item_rows=(await self.rows(log.item_ids)).rows)

    async def _refresh(
        self,
        ids: np.ndarray,
        due: np.ndarray,
        position: np.ndarray,
        in_base: np.ndarray,
        rows: np.ndarray,
        known: np.ndarray,
        now: float,
    ) -> None:
        """Fetch ``ids[due]`` from the store and write them into ``rows``/``known`` and the
        cache; on failure leave ``rows``/``known`` as the cache had them. ``position`` and
        ``in_base`` locate ``ids`` in the base arrays."""
        if now < self._lookups_resume_at:
            self._degraded(len(due), now, None)  # the store failed a moment ago: not yet again
            return
        unique, first, inverse = np.unique(ids[due], return_index=True, return_inverse=True)
        try:
            async with asyncio.timeout(self.lookup_budget_seconds):
                found = await self.table.get_items(unique.tolist())
        except ItemsUnavailable as partial:
            # Some of the table answered (a cluster node is down): keep what it read.
            reached = ~np.asarray(partial.unavailable, dtype=bool)
            self._degraded(int(np.count_nonzero(~reached[inverse])), now, partial)
            due, inverse, unique, first, found = _answered(due, inverse, unique, first, partial)
        except (StoreError, TimeoutError) as error:
            self._lookups_resume_at = now + LOOKUP_BACKOFF_SECONDS
            self._degraded(len(due), now, error)
            return
        located = position[due][first], in_base[due][first]
        self.metrics.item_cache.labels(outcome="miss").inc(len(due))
        stored = {
            item_id: attributes
            for item_id, attributes in zip(unique.tolist(), found, strict=True)
            if attributes is not None
        }
        # Not in the table: the base row, or OOV for an id the base does not hold either.
        base_position, base = located
        if len(self._base_ids):
            fetched_rows = np.where(base[:, None], self._base_rows[base_position], self._oov_row)
        else:
            fetched_rows = np.tile(self._oov_row, (unique.size, 1))
        fetched_known = base.copy()
        if stored:
            overridden = np.fromiter((a is not None for a in found), dtype=bool, count=len(found))
            fetched_rows[overridden] = self._attribute_rows(stored, base[overridden])
            fetched_known[overridden] = True
        rows[due], known[due] = fetched_rows[inverse], fetched_known[inverse]
        # A write (PUT /items) since this fetch started is newer than what it read: keep it.
        until = now + self.ttl_seconds
        self._remember(unique, fetched_rows, fetched_known, until, newer=True, located=located)

    def _degraded(self, count: int, now: float, error: BaseException | None) -> None:
        """Count ``count`` ids answered without the store; log why once in a while (an outage
        must not flood the log)."""
        self.metrics.item_cache.labels(outcome="degraded").inc(count)
        if error is not None and now - self._degraded_logged_at >= DEGRADED_LOG_INTERVAL_SECONDS:
            self._degraded_logged_at = now
            logger.warning("item lookup degraded: %s", error or "lookup budget spent")

    def _remember(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        known: np.ndarray,
        until: float,
        newer: bool = False,
        located: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Cache ``rows`` of unique ``ids`` until ``until``; with ``newer``, only entries that do
        not already hold as long (a concurrent write got there first). ``located``: the ids'
        (positions, in_base) in the base arrays, when the caller has them."""
        position, in_base = located if located is not None else self._base_positions(ids)
        if in_base.any():
            base_positions, base_rows = position[in_base], rows[in_base]
            if newer:
                older = self._until[base_positions] < until
                base_positions, base_rows = base_positions[older], base_rows[older]
            self._rows[base_positions] = base_rows
            self._until[base_positions] = until
        outside = ~in_base
        self._others.write(ids[outside], rows[outside], known[outside], until, newer)

    def _base_positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(M,) positions in the base arrays and (M,) whether the id is there."""
        return self.base.positions(ids)


def _answered(
    due: np.ndarray,
    inverse: np.ndarray,
    unique: np.ndarray,
    first: np.ndarray,
    partial: ItemsUnavailable,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[ItemAttributes | None]]:
    """A lookup's arrays (``due`` (D,) positions, ``inverse`` (D,) into ``unique`` (U,),
    ``first`` (U,) into ``due``) narrowed to the ids the partial answer reached."""
    reached = ~np.asarray(partial.unavailable, dtype=bool)  # (U,)
    kept = reached[inverse]  # (D,)
    renumber = np.cumsum(reached) - 1  # (U,) index among the reached ids
    found = [value for value, ok in zip(partial.found, reached.tolist(), strict=True) if ok]
    first_kept = np.cumsum(kept) - 1  # (D,) index among the kept positions
    return due[kept], renumber[inverse[kept]], unique[reached], first_kept[first[reached]], found
