"""The experiment runner's cache: a run is reused only if it was trained exactly as asked."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from model.experiments.common import _matches, cached_run
from model.nets import net_config
from model.train import TrainSettings


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


def test_the_demo_serves_the_variant_that_won_on_the_tuning_world() -> None:
    """model.demo's network is the one results/ifa_variants.json names: the demo's choice and
    its evidence cannot drift apart."""
    from model.demo import DEMO_NET, DEMO_TRAINING

    recorded = json.loads((Path(__file__).parents[1] / "results/ifa_variants.json").read_text())
    assert recorded["world"].endswith("medium-0")
    assert recorded["winner"] == DEMO_NET == DEMO_TRAINING.net
