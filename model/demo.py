"""Build the demo model the service starts with, once: ``python -m model.demo [--out artifacts]``.

1. the small synthetic world (``data/worlds/small-0``), generated if missing;
2. :data:`DEMO_NET` trained on it with the streaming protocol of :mod:`model.train` (a couple
   of minutes at most on two cores; the checkpoint and metrics are kept under ``runs/demo``);
3. exported with :func:`model.export.export_artifact` into ``--out`` (``<version>/`` + ``LATEST``).

Idempotent: when ``--out/LATEST`` exists nothing is built (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from model.artifact import LATEST_FILE
from model.catalogue import Catalogue
from model.data import load_world
from model.export import (
    DEFAULT_FORMATS,
    catalogue_source,
    export_artifact,
    parse_formats,
    summarise,
)
from model.train import TrainSettings, summary_table, train

DEMO_WORLD = Path("data/worlds/small-0")
DEMO_RUN = Path("runs/demo")
DEMO_NET = "ifa_channel_decay"
"""The IFA variant with the highest click GAUC on the tuning world medium-0, where every design
choice of IFA was made: IFA+degree with the category's exact-match channel and time decay, +2.2pp
click and +1.5pp impression GAUC over IFA+degree there, 3 seeds (results/ifa_variants.md,
``python -m model.experiment ifa_variants``). GET /model names it."""
# Three passes: a demo model should rank sensibly, and the small world is seen in under a minute
# per pass. (Evaluation numbers are the first pass's, on unseen requests, as always.)
DEMO_TRAINING = TrainSettings(
    world=DEMO_WORLD,
    net=DEMO_NET,
    epochs=3,
    batch_size=32,
    lr=1e-2,
    seed=0,
    max_history=1000,
    threads=2,
    out=DEMO_RUN,
)


def ensure_world(path: Path, preset: str, seed: int) -> Path:
    """``path`` as a world directory, generated (aside, then renamed) when it has none."""
    from model.world import write_world

    if (path / "world.json").is_file():
        return path
    staging = path.with_name(f".{path.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    print(f"generating the {preset} world (seed {seed}) into {path}", flush=True)
    write_world(preset, seed, staging, progress=False)
    staging.rename(path)
    return path


def world_identity(path: Path) -> tuple[str, int]:
    """(preset, seed) a world directory is named for (``<preset>-<seed>``), else small-0."""
    match = re.fullmatch(r"([a-z]+)-(\d+)", path.name)
    return (match.group(1), int(match.group(2))) if match else ("small", 0)


def build_demo(
    out: Path,
    world: Path = DEMO_WORLD,
    run_dir: Path = DEMO_RUN,
    formats: Sequence[str] = DEFAULT_FORMATS,
    force: bool = False,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """The demo artefact directory: the existing ``LATEST`` one, or a newly built one."""
    latest = out / LATEST_FILE
    if latest.is_file() and not force:
        directory = out / latest.read_text().strip()
        print(f"demo model already built: {directory} (LATEST); nothing to do")
        return directory
    started = time.perf_counter()
    preset, seed = world_identity(world)
    ensure_world(world, preset, seed)
    settings = replace(DEMO_TRAINING, world=world, out=run_dir, **(training or {}))
    loaded = load_world(world)
    result = train(settings, world=loaded)
    print(summary_table(result), flush=True)
    assert result.checkpoint is not None
    catalogue = Catalogue.load(catalogue_source(world), result.checkpoint.spec)
    directory = export_artifact(result.checkpoint, catalogue, out, formats=formats, log=print)
    print(summarise(directory))
    print(f"demo model built in {time.perf_counter() - started:.0f} s: {directory}")
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="export root")
    parser.add_argument("--world", type=Path, default=DEMO_WORLD, help="world directory")
    parser.add_argument("--run-dir", type=Path, default=DEMO_RUN, help="checkpoint and metrics")
    parser.add_argument("--formats", type=parse_formats, default=DEFAULT_FORMATS)
    parser.add_argument("--force", action="store_true", help="rebuild even if LATEST exists")
    args = parser.parse_args(argv)
    build_demo(args.out, args.world, args.run_dir, args.formats, args.force)


if __name__ == "__main__":
    main()
