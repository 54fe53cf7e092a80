"""The experiment runner's cache: a run is reused only if it was trained exactly as asked."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from model.data import world_fingerprint
from model.experiments.common import _matches, cached_run, ensure_world
from model.nets import net_config
from model.train import TrainSettings
from model.world import write_world


def _metrics_of(settings: TrainSettings) -> dict:
    """What a run writes to metrics.json about how it was trained (as plain JSON)."""
    config = asdict(net_config(settings.net, **settings.net_overrides))
    return json.loads(json.dumps({"settings": asdict(settings), "config": config}, default=str))


def test_a_cached_run_matches_the_settings_and_config_it_was_trained_with():
    settings = TrainSettings(Path("w"), net="ifa", net_overrides={"key_dim": 32})
    assert _matches(_metrics_of(settings), settings)


def test_a_cached_run_with_other_settings_is_retrained():
    settings = TrainSettings(Path("w"), net="ifa", net_overrides={"key_dim": 32})
    assert not _matches(_metrics_of(replace(settings, lr=0.5)), settings)


def test_a_cached_run_from_before_a_config_default_changed_is_retrained():
    settings = TrainSettings(Path("w"), net="ifa", net_overrides={"key_dim": 32})
    stale = _metrics_of(settings)
    stale["config"]["degree_feature"] = not stale["config"]["degree_feature"]
    assert not _matches(stale, settings)


def test_a_run_older_than_its_world_is_retrained(tmp_path: Path):
    world, out = tmp_path / "world", tmp_path / "run"
    world.mkdir()
    out.mkdir()
    settings = TrainSettings(world, net="ifa", net_overrides={"key_dim": 32})
    (world / "world.json").write_text("{}")
    (out / "metrics.json").write_text(json.dumps(_metrics_of(settings)))
    os.utime(world / "world.json", (1_000, 1_000))
    os.utime(out / "metrics.json", (2_000, 2_000))
    assert cached_run(out, settings, world) is not None
    os.utime(world / "world.json", (3_000, 3_000))  # the world was generated again since
    assert cached_run(out, settings, world) is None


def test_a_run_on_a_world_generated_again_at_its_path_is_retrained(tmp_path: Path):
    """The fingerprint of the world's files decides, whatever the timestamps say."""
    world = ensure_world("tiny", 0, tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    settings = TrainSettings(world, net="ifa", net_overrides={"key_dim": 32})
    metrics = {**_metrics_of(settings), "world_fingerprint": world_fingerprint(world)}
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert cached_run(out, settings, world) is not None
    (out / "metrics.json").write_text(json.dumps(_metrics_of(settings)))  # no fingerprint
    assert cached_run(out, settings, world) is None
    (out / "metrics.json").write_text(json.dumps(metrics))
    # Another world at the same path, its files dated before the run, so only the fingerprint
    # can tell.
    shutil.rmtree(world)
    write_world("tiny", 1, world)
    for f in world.iterdir():
        os.utime(f, (1_000, 1_000))
    assert cached_run(out, settings, world) is None


def test_a_world_generated_from_another_config_of_its_preset_is_generated_again(tmp_path):
    world = ensure_world("tiny", 0, tmp_path)
    meta = json.loads((world / "world.json").read_text())
    meta["preset_config"]["n_users"] = 90  # as an earlier version of the preset had it
    (world / "world.json").write_text(json.dumps(meta))
    assert ensure_world("tiny", 0, tmp_path) == world
    assert json.loads((world / "world.json").read_text())["preset_config"]["n_users"] == 100


def test_the_demo_serves_the_variant_that_won_on_the_tuning_world() -> None:
    """model.demo's network is the one results/ifa_variants.json names: the demo's choice and
    its evidence cannot drift apart."""
    from model.demo import DEMO_NET, DEMO_TRAINING

    recorded = json.loads((Path(__file__).parents[1] / "results/ifa_variants.json").read_text())
    assert recorded["world"].endswith("medium-0")
    assert recorded["winner"] == DEMO_NET == DEMO_TRAINING.net
