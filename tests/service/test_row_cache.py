"""The live catalogue's cache of ids outside the model's catalogue (service.row_cache), checked
against the dictionary it replaced: the oldest written dropped first, an id written again the
newest, ``newer`` writes that keep an entry holding as long."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from service import row_cache
from service.featurize_bench import measure
from service.row_cache import RowCache

WIDTH = 3


class DictCache:
    """The reference: an insertion-ordered dictionary, as the live catalogue had it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[int, tuple[float, tuple[int, ...], bool]] = OrderedDict()

    def write(
        self, ids: np.ndarray, rows: np.ndarray, known: np.ndarray, until: float, newer: bool
    ) -> None:
        for item_id, row, is_known in zip(ids.tolist(), rows.tolist(), known.tolist(), strict=True):
            current = self.entries.pop(item_id, None)
            if newer and current is not None and current[0] >= until:
                self.entries[item_id] = current
            else:
                self.entries[item_id] = (until, tuple(row), is_known)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def entries(cache: RowCache, ids: np.ndarray) -> dict[int, tuple[float, tuple[int, ...], bool]]:
    """What ``cache`` holds of ``ids``, as the reference writes it."""
    slot = cache.find(ids)
    return {
        int(i): (float(cache.until[s]), tuple(cache.rows[s].tolist()), bool(cache.known[s]))
        for i, s in zip(ids, slot, strict=True)
        if s >= 0
    }


def write(cache: RowCache, ids: list[int], until: float, newer: bool = False) -> None:
    array = np.array(ids, dtype=np.int64)
    rows = np.stack([array, array + 1, np.full(array.size, int(until))], axis=1)
    cache.write(array, rows, array % 2 == 0, until, newer)


def test_the_oldest_written_is_dropped_first_and_a_rewrite_makes_an_id_the_newest() -> None:
    cache = RowCache(WIDTH, capacity=3)
    write(cache, [10, 11, 12], until=5.0)
    write(cache, [10], until=6.0)  # 11 is now the oldest
    write(cache, [13], until=7.0)
    assert sorted(entries(cache, np.array([10, 11, 12, 13]))) == [10, 12, 13]
    assert len(cache) == 3
    assert entries(cache, np.array([10]))[10] == (6.0, (10, 11, 6), True)


def test_a_newer_write_keeps_an_entry_that_holds_as_long_but_makes_it_the_newest() -> None:
    cache = RowCache(WIDTH, capacity=2)
    write(cache, [1], until=9.0)  # a PUT's entry
    write(cache, [2], until=5.0)
    write(cache, [1, 2], until=8.0, newer=True)  # a fetch that started before the PUT
    found = entries(cache, np.array([1, 2]))
    assert found[1] == (9.0, (1, 2, 9), False) and found[2] == (8.0, (2, 3, 8), True)
    write(cache, [3], until=10.0)  # 1 went to the end with the fetch: 1 is dropped, not 2
    assert sorted(entries(cache, np.array([1, 2, 3]))) == [2, 3]


def test_a_batch_larger_than_the_cache_keeps_its_last_ids_and_repeats_are_found() -> None:
    cache = RowCache(WIDTH, capacity=4)
    write(cache, list(range(100, 110)), until=1.0)
    assert len(cache) == 4
    slot = cache.find(np.array([109, 100, 109, 106, 5, 106]))
    assert (slot >= 0).tolist() == [True, False, True, True, False, True]
    assert slot[0] == slot[2] and cache.ids[slot[0]] == 109


def test_a_cache_of_capacity_zero_holds_nothing() -> None:
    cache = RowCache(WIDTH, capacity=0)
    write(cache, [1, 2], until=1.0)
    assert len(cache) == 0 and (cache.find(np.array([1, 2])) == -1).all()


@pytest.mark.parametrize("capacity", [1, 7, 60])
def test_random_writes_agree_with_the_dictionary(
    capacity: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compactions and rebuilds of both indexes happen many times over (a small RECENT_LIMIT)."""
    monkeypatch.setattr(row_cache, "RECENT_LIMIT", 16)
    rng = np.random.default_rng(capacity)
    cache, reference = RowCache(WIDTH, capacity), DictCache(capacity)
    universe = np.arange(-50, 150) * 7919  # negative and large ids alike
    for step in range(400):
        ids = rng.choice(universe, int(rng.integers(1, 2 * capacity + 3)), replace=False)
        until = float(rng.integers(0, 50))
        newer = bool(rng.integers(0, 2))
        array = np.asarray(ids, dtype=np.int64)
        rows = np.stack([array, np.full(array.size, step), np.full(array.size, 7)], axis=1)
        cache.write(array, rows, array % 2 == 0, until, newer)
        reference.write(array, rows, array % 2 == 0, until, newer)
        assert len(cache) == len(reference.entries), step
        queried = np.concatenate([universe, rng.choice(universe, 50)])  # repeats included
        assert entries(cache, queried) == {
            int(i): reference.entries[int(i)] for i in queried if int(i) in reference.entries
        }, step


@pytest.mark.anyio
async def test_the_featurize_bench_measures_cached_lookups_of_each_mix(artifact_dir: Path) -> None:
    """A short run: every lookup measured is answered from the caches (it asserts so)."""
    report = await measure(artifact_dir, requests=3, seed=0)
    assert list(report["mixes"]) == ["0%", "20%", "60%"]
    assert all(mix["n"] == 3 for mix in report["mixes"].values())
    assert report["mixes"]["60%"]["outside_relative_to_inside"] > 0
