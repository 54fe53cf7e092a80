"""Serving artefacts: every program format agrees with the eager network, versions, the loader
and the ``python -m model.export`` command line.

The artefact is exported once per module (TorchScript, torch.export and eager in one fixture;
AOTInductor, which compiles C++, in its own fixture used only by tests marked slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import model.artifact as artifact_module
from model.artifact import (
    FORMATS,
    LATEST_FILE,
    Manifest,
    ServingModel,
    load_artifact,
    load_catalogue,
    model_version,
    state_version,
)
from model.catalogue import Catalogue
from model.checkpoint import Checkpoint, save_checkpoint
from model.export import ExportError, export_artifact, probe_inputs, training_window
from model.features import DEFAULT_MAX_HISTORY, OBJECTIVES, OOV_INDEX
from model.nets import build_net, config_of
from model.nets.ifa import IFA
from model.serving import ServingEncoder, ServingScorer, serving_programs
from model.train import TrainSettings, train
from model.world import write_world
from tests.factories import small_spec

SPEC = small_spec()
SIZES_N = (0, 1, 5000)
SIZES_M = (1, 7, 1000)
TOLERANCE = 1e-5
FAST_FORMATS = ("torchscript", "export", "eager")


def make_checkpoint(seed: int = 0, time_decay: bool = True) -> Checkpoint:
    torch.manual_seed(seed)
    net = build_net("ifa", SPEC, time_decay=time_decay, tower_hidden=[32, 16])
    return Checkpoint("ifa", SPEC, net, {"seed": seed, "world": "test", "auc": np.float32(0.7)})


def make_catalogue(n: int = 200) -> Catalogue:
    ids = np.arange(n, dtype=np.int64) * 3
    return Catalogue({"item_id": ids, "category": ids % 8, "author": ids % 50}, SPEC)


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return make_checkpoint()


@pytest.fixture(scope="module")
def reference(checkpoint: Checkpoint) -> tuple[ServingEncoder, ServingScorer]:
    assert isinstance(checkpoint.net, IFA)
    return serving_programs(checkpoint.net)


@pytest.fixture(scope="module")
def export_root(checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    export_artifact(checkpoint, make_catalogue(), root, formats=("torchscript", "export"))
    return root


@pytest.fixture(scope="module")
def aoti_export(
    checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[warnings.WarningMessage]]:
    """The AOTInductor export root, and every warning the export let through."""
    root = tmp_path_factory.mktemp("aoti")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_artifact(checkpoint, make_catalogue(), root, formats=("aoti",))
    return root, caught


@pytest.fixture(scope="module")
def aoti_root(aoti_export: tuple[Path, list[warnings.WarningMessage]]) -> Path:
    return aoti_export[0]


@pytest.fixture(scope="module")
def models(export_root: Path) -> dict[str, ServingModel]:
    return {name: load_artifact(export_root, name) for name in FAST_FORMATS}


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def inputs(n: int, m: int) -> Inputs:
    return probe_inputs(SPEC, n, m, seed=100 * n + m)


def assert_matches_eager(
    model: ServingModel, reference: tuple[ServingEncoder, ServingScorer], n: int, m: int
) -> None:
    events, event_times, reference_time, user, candidates = inputs(n, m)
    with torch.no_grad():
        s_ref, z_ref = reference[0](events, event_times, reference_time)
        p_ref, score_ref = reference[1](user, candidates, s_ref, z_ref)

    s, z = model.encode(events, event_times, float(reference_time))
    # S and z are float32 sums over N events: their rounding grows with N in any program, so
    # they are compared relative to their size; everything a caller ranks by is absolute.
    torch.testing.assert_close(s, s_ref, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(z, z_ref, rtol=TOLERANCE, atol=TOLERANCE)
    if n == 0:
        assert not s.any() and not z.any()

    # The scorer on the eager state, and the program's own encode -> score pipeline.
    for state in ((s_ref, z_ref), (s, z)):
        probabilities, score = model.score(user, candidates, *state)
        assert probabilities.shape == (m, len(OBJECTIVES)) and score.shape == (m,)
        assert torch.isfinite(probabilities).all() and torch.isfinite(score).all()
        torch.testing.assert_close(probabilities, p_ref, rtol=0.0, atol=TOLERANCE)
        torch.testing.assert_close(score, score_ref, rtol=0.0, atol=TOLERANCE)


@pytest.mark.parametrize("m", SIZES_M)
@pytest.mark.parametrize("n", SIZES_N)
@pytest.mark.parametrize("program_format", FAST_FORMATS)
def test_program_matches_eager(
    models: dict[str, ServingModel],
    reference: tuple[ServingEncoder, ServingScorer],
    program_format: str,
    n: int,
    m: int,
) -> None:
    assert_matches_eager(models[program_format], reference, n, m)


@pytest.mark.slow
def test_aoti_matches_eager(
    aoti_root: Path, export_root: Path, reference: tuple[ServingEncoder, ServingScorer]
) -> None:
    manifest = Manifest.load(
        aoti_root / (aoti_root / LATEST_FILE).read_text().strip() / "manifest.json"
    )
    status = manifest.formats["aoti"]
    # AOTInductor needs a C++ toolchain; this machine has one, so a failure here is a bug, and
    # the recorded reason says what broke.
    assert status["status"] == "ok", status.get("error")
    # Same checkpoint, different formats and time: same version.
    assert manifest.version == (export_root / LATEST_FILE).read_text().strip()
    model = load_artifact(aoti_root, "aoti")
    for n in SIZES_N:
        for m in SIZES_M:
            assert_matches_eager(model, reference, n, m)


@pytest.mark.slow
def test_aoti_export_lets_no_warning_through(
    aoti_export: tuple[Path, list[warnings.WarningMessage]],
) -> None:
    """torch's TorchScript and LeafSpec deprecations are dropped at the calls that raise them
    (and nothing else is raised), so `make run` prints no warning a user must wonder about."""
    _, caught = aoti_export
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_empty_history_state_is_zeros(models: dict[str, ServingModel]) -> None:
    for model in models.values():
        s, z = model.empty_state()
        events, event_times, reference_time, _, _ = inputs(0, 1)
        s0, z0 = model.encode(events, event_times, float(reference_time))
        assert torch.equal(s, s0) and torch.equal(z, z0) and not s.any()
        assert s.dtype == torch.float32 and s.shape == (4, 16, 16) and z.shape == (4, 16)


def test_long_history_is_encoded_in_chunks(
    models: dict[str, ServingModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["export"]
    events, event_times, reference_time, _, _ = inputs(5000, 1)
    whole = model.encode(events, event_times, float(reference_time))
    monkeypatch.setattr(artifact_module, "ENCODE_CHUNK", 1024)
    chunked = model.encode(events, event_times, float(reference_time))
    for got, want in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE)


def test_manifest_describes_the_model(export_root: Path, checkpoint: Checkpoint) -> None:
    version = (export_root / LATEST_FILE).read_text().strip()
    directory = export_root / version
    manifest = Manifest.load(directory / "manifest.json")
    assert manifest.version == version and version.startswith("ifa-") and len(version) == 16
    assert manifest.net == "ifa" and manifest.net_config == json.loads(
        json.dumps(config_of(checkpoint.net))
    )
    assert manifest.feature_spec() == SPEC
    assert manifest.objectives == list(OBJECTIVES) and manifest.actions == list(SPEC.actions)
    assert manifest.fusion == {"click": 1.0}
    assert (manifest.heads, manifest.key_dim, manifest.value_dim) == (4, 16, 16)
    assert isinstance(checkpoint.net, IFA)
    expected_rates = checkpoint.net.encoder.decay_rates().tolist()
    assert manifest.decay_rates == pytest.approx(expected_rates) and all(
        r > 0 for r in manifest.decay_rates
    )
    assert manifest.dtype == "float32"
    assert set(manifest.files) == {"torchscript", "export", "eager"}
    for files in manifest.files.values():
        assert all((directory / name).is_file() for name in files.values())
    assert all(status["status"] == "ok" for status in manifest.formats.values())
    assert manifest.training == {"seed": 0, "world": "test", "auc": pytest.approx(0.7)}
    assert manifest.catalogue_items == 200


def test_decay_off_records_zero_rates(tmp_path: Path) -> None:
    directory = export_artifact(
        make_checkpoint(time_decay=False), make_catalogue(), tmp_path, formats=()
    )
    manifest = Manifest.load(directory / "manifest.json")
    assert manifest.decay_rates == [0.0] * manifest.heads
    assert set(manifest.files) == {"eager"}


def test_version_changes_with_weights_and_fusion_only(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    net = checkpoint.net
    config = config_of(net)
    weights = net.state_dict()
    base = model_version("ifa", config, SPEC, {"click": 1.0}, weights)
    assert base == model_version("ifa", config, SPEC, {"click": 1.0, "like": 0.0}, weights)
    changed = {k: v.clone() for k, v in weights.items()}
    changed["scorer.query.bias"][0] += 1e-6
    assert model_version("ifa", config, SPEC, {"click": 1.0}, changed) != base
    assert model_version("ifa", config, SPEC, {"click": 1.0, "like": 0.2}, weights) != base

    # Re-exporting the same checkpoint replaces the version in place; new weights add one.
    first = export_artifact(checkpoint, make_catalogue(), tmp_path, formats=())
    again = export_artifact(checkpoint, make_catalogue(), tmp_path, formats=())
    other = export_artifact(make_checkpoint(seed=1), make_catalogue(), tmp_path, formats=())
    assert first == again and first.name == base and other.name != base
    assert (tmp_path / LATEST_FILE).read_text().strip() == other.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST_FILE, base, other.name])


def test_state_version_covers_the_encoder_and_the_catalogue_not_fusion(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """Cached user states are keyed by it: what changes a state changes it, nothing else does."""
    net = checkpoint.net
    config, weights, catalogue = config_of(net), net.state_dict(), make_catalogue()
    base = state_version("ifa", config, SPEC, weights, catalogue)
    assert any(name.startswith("encoder.event_embedding.") for name in weights)
    scorer_only = {k: v.clone() for k, v in weights.items()}
    scorer_only["scorer.query.bias"][0] += 1.0
    assert state_version("ifa", config, SPEC, scorer_only, catalogue) == base
    encoder = {k: v.clone() for k, v in weights.items()}
    encoder["encoder.key.bias"][0] += 1e-6
    assert state_version("ifa", config, SPEC, encoder, catalogue) != base
    other_items = Catalogue(
        {**catalogue.columns, "category": (catalogue.columns["category"] + 1) % 8}, SPEC
    )
    assert state_version("ifa", config, SPEC, weights, other_items) != base

    # Exported with other fusion weights: a new model version, the same state version.
    click = export_artifact(checkpoint, catalogue, tmp_path, {"click": 1.0}, formats=())
    like = export_artifact(checkpoint, catalogue, tmp_path, {"like": 1.0}, formats=())
    manifests = [Manifest.load(d / "manifest.json") for d in (click, like)]
    assert manifests[0].version != manifests[1].version
    assert manifests[0].state_version == manifests[1].state_version == base
    # An artefact from before state versions gets one derived from its files when loaded.
    old = Manifest.load(click / "manifest.json")
    old.state_version = None
    old.save(click / "manifest.json")
    derived = load_artifact(click, "eager").manifest.state_version
    assert derived is not None and derived.startswith("state-") and derived != base
    assert load_artifact(click, "eager").manifest.state_version == derived


def test_loader_rejects_unknown_format(export_root: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown program format 'onnx'; expected one of"):
        load_artifact(export_root, "onnx")
    with pytest.raises(ValueError, match=r"no 'aoti' programs \(it was not exported\)"):
        load_artifact(export_root, "aoti")
    with pytest.raises(FileNotFoundError):
        load_artifact(export_root / "missing")


def test_latest_and_catalogue_are_loadable(export_root: Path) -> None:
    model = load_artifact(export_root)
    assert model.program_format == "torchscript"
    assert isinstance(model, ServingModel)
    catalogue = load_catalogue(export_root)
    rows, known = catalogue.rows(np.array([3, 4]))
    np.testing.assert_array_equal(known, [True, False])
    assert (rows[1] == OOV_INDEX).all()
    np.testing.assert_array_equal(model.catalogue.rows(np.array([3, 4]))[0], rows)


def test_serving_model_checks_its_inputs(models: dict[str, ServingModel]) -> None:
    model = models["torchscript"]
    events, event_times, reference_time, user, candidates = inputs(4, 3)
    s, z = model.empty_state()
    with pytest.raises(ValueError, match="at least one candidate"):
        model.score(user, candidates[:0], s, z)
    with pytest.raises(ValueError, match="candidates must have shape"):
        model.score(user, candidates[:, :2], s, z)
    too_big = candidates.clone()
    too_big[0, 0] = SPEC.item_fields[0].rows
    with pytest.raises(ValueError, match="outside the spec's tables"):
        model.score(user, too_big, s, z)
    with pytest.raises(TypeError, match="integer tensor"):
        model.score(user, candidates.float(), s, z)
    with pytest.raises(ValueError, match="state shapes"):
        model.score(user, candidates, s[:2], z)
    with pytest.raises(ValueError, match="event_times has 3 entries"):
        model.encode(events, event_times[:3], float(reference_time))


def test_optional_aoti_failure_is_recorded(
    checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> str:
        raise RuntimeError("no C++ compiler on this host")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    directory = export_artifact(
        checkpoint, make_catalogue(), tmp_path, formats=("torchscript", "aoti")
    )
    manifest = Manifest.load(directory / "manifest.json")
    assert manifest.formats["aoti"]["status"] == "failed"
    assert "no C++ compiler on this host" in manifest.formats["aoti"]["error"]
    assert "aoti" not in manifest.files and not (directory / "aoti").exists()
    with pytest.raises(ValueError, match="its export failed: RuntimeError: no C\\+\\+ compiler"):
        load_artifact(directory, "aoti")
    load_artifact(directory, "torchscript")  # the other formats still ship


def test_required_format_failure_raises_and_leaves_nothing(
    checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("scripting broke")

    monkeypatch.setattr(torch.jit, "script", broken)
    with pytest.raises(ExportError, match="torchscript export failed: scripting broke"):
        export_artifact(checkpoint, make_catalogue(), tmp_path, formats=("torchscript",))
    assert list(tmp_path.iterdir()) == []


def test_only_ifa_exports(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="only IFA"):
        export_artifact(
            Checkpoint("avgpool", SPEC, torch.nn.Linear(1, 1)), make_catalogue(), tmp_path
        )
    with pytest.raises(ValueError, match="unknown formats"):
        export_artifact(make_checkpoint(), make_catalogue(), tmp_path, formats=("onnx",))
    with pytest.raises(ValueError, match="unknown fusion objectives"):
        export_artifact(make_checkpoint(), make_catalogue(), tmp_path, fusion={"share": 1.0})


def test_cli_end_to_end(tmp_path: Path) -> None:
    checkpoint_path = tmp_path / "ifa.pt"
    checkpoint = make_checkpoint(seed=3, time_decay=False)
    checkpoint.metadata = {"seed": 3}
    save_checkpoint(checkpoint, checkpoint_path)
    world = tmp_path / "world"
    world.mkdir()
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array([5, 6, 7], pa.int64()),
                "category": pa.array([1, 2, 3], pa.int64()),
                "author": pa.array([4, 4, 9], pa.int64()),
                "popularity": pa.array([0.1, 0.2, 0.3]),
            }
        ),
        world / "items.parquet",
    )
    out = tmp_path / "artifacts"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.export",
            "--checkpoint",
            str(checkpoint_path),
            "--catalogue",
            str(world),
            "--out",
            str(out),
            "--fusion",
            "click=1.0,like=0.2",
            "--formats",
            "torchscript,export",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    version = (out / LATEST_FILE).read_text().strip()
    assert f"version   {version}" in result.stdout and "torchscript  ok" in result.stdout
    model = load_artifact(out, "export")
    assert model.manifest.fusion == {"click": 1.0, "like": 0.2}
    assert len(model.catalogue) == 3
    rows, _ = model.catalogue.rows(np.array([7, 8]))
    events, event_times, reference_time, user, _ = inputs(10, 2)
    s, z = model.encode(events, event_times, float(reference_time))
    probabilities, score = model.score(user, torch.from_numpy(rows), s, z)
    torch.testing.assert_close(
        score, probabilities[:, 0] * (probabilities[:, 1] + 0.2 * probabilities[:, 3])
    )

    bad = subprocess.run(
        [
            *(sys.executable, "-m", "model.export", "--checkpoint", str(checkpoint_path)),
            *("--catalogue", str(world), "--out", str(out), "--formats", "onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "unknown formats ['onnx']" in bad.stderr


def test_every_format_is_covered() -> None:
    assert set(FORMATS) == {*FAST_FORMATS, "aoti"}


@pytest.mark.parametrize(
    ("metadata", "window"),
    [
        ({"settings": {"max_history": 250}}, 250),
        ({"settings": {"max_history": None}}, None),
        ({"seed": 1}, DEFAULT_MAX_HISTORY),  # no recorded settings: the default window
    ],
)
def test_manifest_carries_the_training_window(
    metadata: dict[str, object], window: int | None, tmp_path: Path
) -> None:
    checkpoint = make_checkpoint(time_decay=False)
    checkpoint.metadata = metadata
    directory = export_artifact(checkpoint, make_catalogue(), tmp_path, formats=())
    assert Manifest.load(directory / "manifest.json").max_history == window


def test_a_training_run_records_the_window_the_export_reads(tmp_path: Path) -> None:
    write_world("tiny", 0, tmp_path / "world")
    settings = TrainSettings(
        world=tmp_path / "world", max_history=40, max_requests=32, batch_size=16, progress=False
    )
    result = train(settings)
    assert result.checkpoint is not None
    assert training_window(result.checkpoint.metadata) == 40
    assert TrainSettings(world=tmp_path).max_history == DEFAULT_MAX_HISTORY


def _contained_calls(model: ServingModel, attempts: int = 100) -> int:
    """Short encodes on this thread that began and ended inside one long encode on another
    thread (possible only when two calls of the program run at once), each checked against the
    same encode run alone."""
    long_inputs, short_inputs = inputs(16000, 1), inputs(4, 1)
    alone = model.encode(short_inputs[0], short_inputs[1], float(short_inputs[2]))
    spans: list[tuple[float, float]] = []
    done = threading.Event()

    def encode_long() -> None:
        while not done.is_set():
            started = time.perf_counter()
            model.encode(long_inputs[0], long_inputs[1], float(long_inputs[2]))
            spans.append((started, time.perf_counter()))

    other = threading.Thread(target=encode_long)
    other.start()
    shorts = []
    try:
        while len(spans) < 2:  # the other thread is under way
            time.sleep(0.001)
        for _ in range(attempts):
            started = time.perf_counter()
            s, z = model.encode(short_inputs[0], short_inputs[1], float(short_inputs[2]))
            shorts.append((started, time.perf_counter()))
            torch.testing.assert_close((s, z), alone, rtol=0.0, atol=0.0)
    finally:
        done.set()
        other.join()
    return sum(1 for s in shorts if any(a < s[0] and s[1] < b for a, b in spans))


@pytest.mark.slow
def test_a_short_aoti_call_does_not_wait_for_a_long_one(aoti_root: Path) -> None:
    """With the runners the service loads (one per calling thread), a fold on the event loop
    runs while the model thread encodes a whole history, and gets the same state."""
    assert _contained_calls(load_artifact(aoti_root, "aoti", runners=2)) > 0
