"""``python -m service.bench --parts featurize``: the featurize stage of a /rank per candidate,
for candidates inside and outside the model's catalogue, every one of them cached.

For each source tree (this one, and with ``--baseline REV`` that revision's), a process of that
tree's :class:`service.items.LiveCatalogue` over the model's catalogue and an in-process item
table holding 20,000 items added through ``PUT /items``; 20,000 unknown ids are looked up once
(negative entries) and every catalogue id once, so that each lookup measured is answered from
the worker's caches. Then, request by request in turn, M = 1,000 distinct candidates as a Python
list (as /rank has them) go through the featurize stage (list → array, ``LiveCatalogue.rows``):
all in the catalogue; a fifth outside it (half added items, half unknown ids); three fifths
outside. Reported: p50/p99 per mix, and what an outside candidate costs relative to an inside
one, from the p50s: ``(p50(mix) - p50(inside)) / outside + p50(inside) / M`` over
``p50(inside) / M`` (target: within 1.2).

Results go to results/featurize_bench.{json,md}: results/service_bench.* is written whole by the
latency and cpu parts, which a part run alone would erase.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

M = 1000
ADDED_ITEMS = 20_000
UNKNOWN_IDS = 20_000
OUTSIDE_SHARES = (0.0, 0.2, 0.6)
TARGET_RATIO = 1.2
TREE_SCRIPT = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); "
    "runpy.run_path(sys.argv[2], run_name='__main__')"
)
"""Runs this file with another tree's ``service`` package first on the path: the measurement is
this file's, the code measured the tree's."""


async def measure(model_dir: Path, requests: int, seed: int) -> dict[str, Any]:
    """Featurize timings of the tree whose ``service`` package is imported."""
    from model.artifact import load_artifact
    from service.items import LiveCatalogue
    from service.metrics import Metrics
    from service.stores.memory import MemoryStore

    rng = np.random.default_rng(seed)
    base = load_artifact(model_dir).catalogue
    base_ids = np.asarray(base.item_ids)
    metrics = Metrics()
    catalogue = LiveCatalogue(
        base, MemoryStore(), metrics, ttl_seconds=3600.0, capacity=50_000,
        lookup_budget_seconds=5.0,
    )  # fmt: skip
    top = int(base_ids.max()) + 1
    added = np.arange(top, top + ADDED_ITEMS)
    unknown = np.arange(top + ADDED_ITEMS, top + ADDED_ITEMS + UNKNOWN_IDS)
    for chunk in np.array_split(added, ADDED_ITEMS // 1000):
        attributes = {name: int(rng.integers(0, 8)) for name in catalogue.attribute_names}
        await catalogue.put({int(i): attributes for i in chunk})
    for chunk in np.array_split(np.concatenate([unknown, base_ids]), 50):
        await catalogue.rows(chunk)  # negative entries, and the catalogue's ids fresh

    def fetched() -> float:
        return metrics.registry.get_sample_value("ifa_item_cache_total", {"outcome": "miss"}) or 0

    fetched_before = fetched()
    timings: dict[float, list[float]] = {share: [] for share in OUTSIDE_SHARES}
    for _ in range(requests):
        for share, seen in timings.items():  # in turn, so that machine load weighs on each alike
            outside = round(M * share)
            candidates = rng.permutation(
                np.concatenate([
                    rng.choice(base_ids, M - outside, replace=False),
                    rng.choice(added, outside // 2, replace=False),
                    rng.choice(unknown, outside - outside // 2, replace=False),
                ])
            ).tolist()  # fmt: skip
            started = time.perf_counter()
            await catalogue.rows(np.asarray(candidates, dtype=np.int64))
            seen.append(time.perf_counter() - started)
    assert fetched() == fetched_before, "a lookup measured went to the item table"
    mixes = {f"{share:.0%}": _percentiles(seen) for share, seen in timings.items()}
    inside = mixes["0%"]["p50_ms"] / M
    for share, name in zip(OUTSIDE_SHARES[1:], list(mixes)[1:], strict=True):
        outside = round(M * share)
        extra = (mixes[name]["p50_ms"] - mixes["0%"]["p50_ms"]) / outside
        mixes[name]["outside_relative_to_inside"] = (inside + extra) / inside
    return {"mixes": mixes, "inside_us_per_candidate": inside * 1000.0}


def featurize(model_dir: Path, roots: dict[str, Path], requests: int) -> dict[str, Any]:
    """:func:`measure` in a process per tree, trees taking turns twice; the faster run of each
    is kept (machine load only slows)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
    for seed in range(2):
        for name, root in roots.items():
            done = subprocess.run(
                [sys.executable, "-c", TREE_SCRIPT, str(root), __file__, str(model_dir),
                 str(requests), str(seed)],
                cwd=root, check=True, capture_output=True, text=True,
            )  # fmt: skip
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        name: min(found, key=lambda run: run["mixes"]["0%"]["p50_ms"])
        for name, found in runs.items()
    }


def write(out: Path, report: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "featurize_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Featurize stage per candidate",
        "",
        f"Generated by `{report['command']}`. {report['machine']}; model {report['model']}. "
        f"M = {M} distinct candidates per request, every one cached (item cache TTL 1 h): all "
        "in the model's catalogue, or a share outside it (half items added through PUT /items, "
        f"half unknown ids). {report['requests']} requests per mix, in turn; per tree the faster "
        "of two runs. Times in ms; the ratio is an outside candidate's cost over an inside "
        f"one's (target ≤ {TARGET_RATIO}).",
        "",
        "| tree | outside | p50 | p99 | outside / inside |",
        "|---|---:|---:|---:|---:|",
    ]
    for tree, run in report["trees"].items():
        for name, mix in run["mixes"].items():
            ratio = mix.get("outside_relative_to_inside")
            lines.append(
                f"| {tree} | {name} | {mix['p50_ms']:.3f} | {mix['p99_ms']:.3f} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "featurize_bench.md").write_text(text)
    return text


def _percentiles(seconds: list[float]) -> dict[str, float]:
    array = np.asarray(seconds) * 1000.0
    return {
        "p50_ms": float(np.percentile(array, 50)),
        "p99_ms": float(np.percentile(array, 99)),
        "n": len(array),
    }


if __name__ == "__main__":
    model, count, seed_text = sys.argv[-3:]  # after the tree and this file's path
    print(json.dumps(asyncio.run(measure(Path(model), int(count), int(seed_text)))))
