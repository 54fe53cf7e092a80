"""Checkpoint -> versioned serving artefact (layout in :mod:`model.artifact`).

    python -m model.export --checkpoint runs/ifa.pt --catalogue worlds/default --out artifacts \\
        [--fusion click=1.0,like=0.2] [--formats torchscript,export,aoti] [--precisions fp32,bf16]

Each requested format is built, loaded back and checked against the eager network on probe
inputs (N = 0 and M = 1 included) before it is listed in the manifest; a format that disagrees
by more than 1e-5 is not shipped. Each format also gets a bf16 scorer (the objective towers in
bfloat16, :func:`model.serving.bf16_scorer`) unless ``--precisions fp32``; it is checked against
the eager bf16 scorer, within bf16's rounding (1e-2). TorchScript and torch.export are required
(a failure is an error); AOTInductor needs a working C++ toolchain, so its failure is recorded
in the manifest with the reason and the export goes on. The artefact is assembled in a hidden
temporary directory and renamed into place, then ``LATEST`` is replaced atomically, so a reader
never sees a half-written version.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from model.artifact import (
    CATALOGUE_FILE,
    CHECKPOINT_FILE,
    FORMATS,
    LATEST_FILE,
    MANIFEST_FILE,
    PRECISIONS,
    PROGRAM_FILES,
    SCORER_ROLES,
    Manifest,
    Program,
    compile_target,
    load_program_files,
    model_version,
    plain_data,
    quiet_torchscript_deprecation,
    state_version,
)
from model.catalogue import Catalogue
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.features import DEFAULT_MAX_HISTORY, FeatureSpec, Field
from model.nets import config_of
from model.nets.ifa import IFA
from model.serving import (
    ServingEncoder,
    bf16_scorer,
    default_fusion,
    fusion_vector,
    serving_programs,
    split_programs,
)

DEFAULT_FORMATS: tuple[str, ...] = ("torchscript", "export", "aoti")
OPTIONAL_FORMATS: tuple[str, ...] = ("aoti",)
"""Formats whose failure is recorded rather than raised (they depend on the host toolchain)."""
VERIFY_TOLERANCE = 1e-5
BF16_VERIFY_TOLERANCE = 1e-2
"""A bf16 scorer against the eager bf16 scorer: a compiled program may round a sum of bf16
products differently; a probability off by more is a wrong program, not rounding."""
TOLERANCES: dict[str, float] = {"fp32": VERIFY_TOLERANCE, "bf16": BF16_VERIFY_TOLERANCE}
PROBE_SIZES: tuple[tuple[int, int], ...] = ((0, 1), (1, 1), (3, 5), (64, 17))
"""(N events, M candidates) checked against eager for every format before it ships."""
WORLD_ITEMS_FILE = "items.parquet"
_LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
"""torch's own FutureWarning raised inside AOTInductor packaging (see ``_Builder.aoti``)."""


class ExportError(RuntimeError):
    """A required format could not be built or disagreed with the eager network."""


# -- example and probe inputs -----------------------------------------------------------------


def _random_rows(fields: Sequence[Field], count: int, generator: torch.Generator) -> Tensor:
    """(count, F) valid embedding rows (padding and OOV included) for the given fields."""
    columns = [torch.randint(0, f.rows, (count,), generator=generator) for f in fields]
    return torch.stack(columns, dim=1) if columns else torch.zeros(count, 0, dtype=torch.int64)


def probe_inputs(
    spec: FeatureSpec, n_events: int, n_candidates: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """events (N, F_event), event_times (N,) f64, reference_time () f64, user (F_user,),
    candidates (M, F_item): random but valid rows, events spread over the last 60 days."""
    generator = torch.Generator().manual_seed(seed)
    reference_time = torch.tensor(1.7e9, dtype=torch.float64)
    ages = torch.rand(n_events, generator=generator, dtype=torch.float64) * 60 * 86400.0
    event_times = (reference_time - ages).sort().values
    events = _random_rows(spec.event_fields, n_events, generator)
    user = _random_rows(spec.user_fields, 1, generator)[0]
    candidates = _random_rows(spec.item_fields, n_candidates, generator)
    return events, event_times, reference_time, user, candidates


# -- building each format ---------------------------------------------------------------------


class _Builder:
    """Builds the program files of each format into ``directory``: the encoder and one scorer
    per precision (role "scorer", "scorer_bf16")."""

    def __init__(
        self,
        encoder: ServingEncoder,
        scorers: Mapping[str, nn.Module],
        spec: FeatureSpec,
        directory: Path,
    ):
        self.modules: dict[str, nn.Module] = {"encoder": encoder}
        self.modules.update({SCORER_ROLES[p]: scorer for p, scorer in scorers.items()})
        self.spec = spec
        self.directory = directory
        self._exported: dict[str, torch.export.ExportedProgram] | None = None

    def path(self, program_format: str, role: str) -> Path:
        path = self.directory / PROGRAM_FILES[program_format][role]
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def torchscript(self) -> None:
        with quiet_torchscript_deprecation():
            for role, module in self.modules.items():
                scripted = torch.jit.script(module)
                torch.jit.save(scripted, str(self.path("torchscript", role)))

    def exported(self) -> dict[str, torch.export.ExportedProgram]:
        """torch.export programs by role with dynamic N ≥ 0 and M ≥ 1, traced once for both
        formats.

        The example sizes (8, 8) avoid 0/1 so no dimension is specialised by the trace; the
        declared minimums then admit N = 0 and M = 1, which verification exercises.
        """
        if self._exported is None:
            events, event_times, reference_time, user, candidates = probe_inputs(self.spec, 8, 8)
            n_events = Dim("events", min=0)
            n_candidates = Dim("candidates", min=1)
            encoder = self.modules["encoder"]
            with torch.no_grad():
                exported = {
                    "encoder": torch.export.export(
                        encoder,
                        (events, event_times, reference_time),
                        dynamic_shapes=({0: n_events}, {0: n_events}, None),
                    )
                }
                s, z = encoder(events, event_times, reference_time)
                for role, scorer in self.modules.items():
                    if role != "encoder":
                        exported[role] = torch.export.export(
                            scorer,
                            (user, candidates, s, z),
                            dynamic_shapes=(None, {0: n_candidates}, None, None),
                        )
            self._exported = exported
        return self._exported

    def export(self) -> None:
        for role, program in self.exported().items():
            torch.export.save(program, str(self.path("export", role)))

    def aoti(self) -> None:
        for role, program in self.exported().items():
            # Inductor imports torch.utils.mkldnn, whose ScriptModules trip the same TorchScript
            # deprecation warning at import; and AOTInductor's packaging itself still tests
            # `isinstance(treespec, LeafSpec)`, which this torch deprecates (a FutureWarning
            # per program). Neither is ours to act on; only those exact messages are dropped.
            with quiet_torchscript_deprecation(), warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=_LEAFSPEC_DEPRECATION, category=FutureWarning
                )
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(self.path("aoti", role))
                )

    def build(self, program_format: str) -> None:
        builders: dict[str, Callable[[], None]] = {
            "torchscript": self.torchscript,
            "export": self.export,
            "aoti": self.aoti,
            "eager": lambda: None,  # the checkpoint copy is the eager format
        }
        builders[program_format]()


def verify_programs(
    encoder: Program,
    scorer: Program,
    reference: tuple[ServingEncoder, nn.Module],
    spec: FeatureSpec,
    sizes: Sequence[tuple[int, int]] = PROBE_SIZES,
) -> float:
    """Largest disagreement with the eager programs over probe inputs.

    Probabilities and scores are compared absolutely; the state relatively, because S and z are
    sums over N events and their float32 rounding grows with N whatever the program does.
    """
    worst = 0.0
    with torch.no_grad():
        for seed, (n_events, n_candidates) in enumerate(sizes):
            events, event_times, reference_time, user, candidates = probe_inputs(
                spec, n_events, n_candidates, seed
            )
            s_ref, z_ref = reference[0](events, event_times, reference_time)
            s, z = encoder(events, event_times, reference_time)
            for got, want in ((s, s_ref), (z, z_ref)):
                scale = want.abs().max().clamp(min=1.0)
                worst = max(worst, float(((got - want).abs().max() / scale).item()))
            p_ref, score_ref = reference[1](user, candidates, s_ref, z_ref)
            p, score = scorer(user, candidates, s_ref, z_ref)
            for got, want in ((p, p_ref), (score, score_ref)):
                if got.shape != want.shape or not bool(torch.isfinite(got).all()):
                    return float("inf")
                worst = max(worst, float((got - want).abs().max().item()))
    return worst


# -- the artefact -----------------------------------------------------------------------------


def export_artifact(
    checkpoint: Checkpoint,
    catalogue: Catalogue,
    out_dir: Path,
    fusion: Mapping[str, float] | None = None,
    formats: Collection[str] = DEFAULT_FORMATS,
    update_latest: bool = True,
    log: Callable[[str], None] | None = None,
    precisions: Collection[str] = PRECISIONS,
    split_scorer: bool = False,
) -> Path:
    """Write ``out_dir/<version>/`` for an IFA checkpoint and return that directory.

    ``precisions``: the scorers each format holds ("fp32" always; "bf16" adds the bf16 one).
    ``split_scorer``: ship :class:`model.split_scorer.SplitScorer` (checked against the network's
    scorer like any program); off by default, as it costs more than it saves on this project's
    reference CPU in AOTInductor (results/split_scorer.md).

    ``fusion`` (weights by action name) defaults to the checkpoint's ``metadata["fusion"]``,
    else the vocabulary's first action only (click in the default one). The
    catalogue is re-featurised under the checkpoint's spec. Raises :class:`ExportError` when a
    required format (any but AOTInductor) fails to build or to verify.
    """
    check_formats(formats)
    check_precisions(precisions)
    net = checkpoint.net
    if not isinstance(net, IFA):
        raise TypeError(
            f"only IFA splits into an encoder and a scorer; "
            f"{checkpoint.net_name!r} cannot be served"
        )
    objectives = checkpoint.spec.objectives
    fusion = dict(
        fusion
        if fusion is not None
        else checkpoint.metadata.get("fusion", default_fusion(objectives))
    )
    fusion_vector(fusion, objectives)  # validates the names before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _message: None)

    was_training = net.training
    try:
        # What ships is checked against the network's own scorer in the same precision.
        encoder, scorer = serving_programs(net, fusion)  # puts the net in eval mode
        references: dict[str, tuple[ServingEncoder, nn.Module]] = {"fp32": (encoder, scorer)}
        if "bf16" in precisions:
            references["bf16"] = (encoder, bf16_scorer(scorer))
        shipped = {
            p: split_programs(net, fusion, p)[1] if split_scorer else pair[1]
            for p, pair in references.items()
        }
        version = model_version(
            checkpoint.net_name, config_of(net), checkpoint.spec, fusion, net.state_dict()
        )
        staging = out_dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            manifest = _build(
                checkpoint, catalogue, references, shipped, fusion, formats, version, staging, say
            )
            manifest.scorer = "split" if split_scorer else "network"
            manifest.save(staging / MANIFEST_FILE)
            final = _publish(staging, out_dir / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        net.train(was_training)
    if update_latest:
        write_latest(out_dir, version)
    return final


def _build(
    checkpoint: Checkpoint,
    catalogue: Catalogue,
    references: Mapping[str, tuple[ServingEncoder, nn.Module]],
    shipped: Mapping[str, nn.Module],
    fusion: dict[str, float],
    formats: Collection[str],
    version: str,
    staging: Path,
    say: Callable[[str], None],
) -> Manifest:
    spec = checkpoint.spec
    net = checkpoint.net
    assert isinstance(net, IFA)
    metadata = plain_data(checkpoint.metadata)
    save_checkpoint(Checkpoint(checkpoint.net_name, spec, net, metadata), staging / CHECKPOINT_FILE)
    Catalogue(catalogue.columns, spec).save(staging / CATALOGUE_FILE)

    encoder_module = references["fp32"][0]
    builder = _Builder(encoder_module, shipped, spec, staging)
    roles = {"encoder", *(SCORER_ROLES[p] for p in references)}
    files: dict[str, dict[str, str]] = {}
    statuses: dict[str, dict[str, Any]] = {}
    for program_format in [f for f in FORMATS if f in formats or f == "eager"]:
        started = time.perf_counter()
        status: dict[str, Any] = {"status": "ok"}
        try:
            builder.build(program_format)
            format_files = {
                role: name
                for role, name in PROGRAM_FILES[program_format].items()
                if role in roles or program_format == "eager"
            }
            paths = {role: staging / name for role, name in format_files.items()}
            for precision, reference in references.items():
                encoder, scorer = load_program_files(paths, program_format, fusion, precision)
                error = verify_programs(encoder, scorer, reference, spec)
                key = "max_abs_error" if precision == "fp32" else f"{precision}_max_abs_error"
                status[key] = error
                if not error <= TOLERANCES[precision]:
                    raise ExportError(
                        f"{program_format} {precision} programs disagree with eager by "
                        f"{error:.3g} (tolerance {TOLERANCES[precision]})"
                    )
            status["bytes"] = sum(p.stat().st_size for p in paths.values())
            files[program_format] = dict(format_files)
        except Exception as exc:
            if program_format not in OPTIONAL_FORMATS:
                raise ExportError(f"{program_format} export failed: {exc}") from exc
            status = {"status": "failed", "error": _reason(exc)}
            shutil.rmtree(staging / program_format, ignore_errors=True)
        status["seconds"] = round(time.perf_counter() - started, 3)
        if program_format == "aoti" and status["status"] == "ok":
            # Compiled code targets the ISA inductor detected here: the loader's "auto" format
            # takes it only on a machine that matches (model.artifact.aoti_matches_host).
            status["compiled_for"] = compile_target()
        statuses[program_format] = status
        say(f"  {program_format:<12} {status['status']:<7} {status['seconds']:7.1f} s")

    config = net.config
    return Manifest(
        version=version,
        net=checkpoint.net_name,
        net_config=config_of(net),
        spec=spec.to_dict(),
        objectives=list(spec.objectives),
        actions=list(spec.actions),
        fusion={k: float(v) for k, v in fusion.items()},
        heads=config.heads,
        key_dim=net.encoder.state_key_dim,
        value_dim=config.value_dim,
        state_tensor_bytes=4 * config.heads * net.encoder.state_key_dim * (config.value_dim + 1),
        channel=channel_description(net),
        decay_rates=[float(r) for r in net.encoder.decay_rates().detach()],
        dtype="float32",
        files=files,
        formats=statuses,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training=metadata,
        torch_version=torch.__version__,
        catalogue_items=len(catalogue),
        state_version=state_version(
            checkpoint.net_name, config_of(net), spec, net.state_dict(), catalogue
        ),
        max_history=training_window(metadata),
    )


def channel_description(net: IFA) -> dict[str, Any] | None:
    """The manifest's account of the exact-match channel: fields, slots per field."""
    channel = net.encoder.channel
    if channel is None:
        return None
    return {"fields": list(net.config.channel_fields), "slots": list(channel.sizes)}


def training_window(metadata: dict[str, Any]) -> int | None:
    """The history window of the training run a checkpoint's metadata describes.

    Runs record their settings (``model.train``); a checkpoint without them (written by hand,
    or before runs recorded settings) was trained under the default window.
    """
    settings = metadata.get("settings")
    if isinstance(settings, dict) and "max_history" in settings:
        window = settings["max_history"]
        return None if window is None else int(window)
    return DEFAULT_MAX_HISTORY


def _reason(exc: BaseException) -> str:
    """A failure reason short enough for a manifest: type, message, and the innermost frame."""
    message = f"{type(exc).__name__}: {exc}".strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return (message[:1500] + where)[:2000]


def _publish(staging: Path, final: Path) -> Path:
    """Rename the staged directory into place. Versions are content hashes, so an existing
    directory of the same version holds the same model: it is swapped out, then removed."""
    if final.exists():
        retired = final.parent / f".retired-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


def write_latest(out_dir: Path, version: str) -> None:
    """Point ``out_dir/LATEST`` at a version, atomically (write a temporary file, rename)."""
    temporary = out_dir / f".{LATEST_FILE}.{uuid.uuid4().hex[:8]}"
    temporary.write_text(version + "\n")
    os.replace(temporary, out_dir / LATEST_FILE)


# -- command line -----------------------------------------------------------------------------


def parse_fusion(text: str) -> dict[str, float]:
    """``click=1.0,like=0.2`` -> {"click": 1.0, "like": 0.2}."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"fusion entry {part!r} is not name=weight")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"fusion weight {value!r} is not a number") from None
    return weights


def check_formats(formats: Collection[str]) -> None:
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; expected some of {list(FORMATS)}")


def check_precisions(precisions: Collection[str]) -> None:
    if "fp32" not in precisions or set(precisions) - set(PRECISIONS):
        raise ValueError(
            f"precisions {sorted(precisions)}: expected fp32 and optionally bf16 "
            f"(some of {list(PRECISIONS)})"
        )


def comma_list(check: Callable[[Collection[str]], None]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list, checked as the exporter checks it."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        try:
            check(values)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return values

    return parse


parse_formats = comma_list(check_formats)
parse_precisions = comma_list(check_precisions)


def catalogue_source(path: Path) -> Path:
    """A Parquet file, or a world directory's ``items.parquet``."""
    if path.is_dir():
        for name in (WORLD_ITEMS_FILE, CATALOGUE_FILE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds neither {WORLD_ITEMS_FILE} nor {CATALOGUE_FILE}")
    if not path.is_file():
        raise FileNotFoundError(f"catalogue {path} does not exist")
    return path


def summarise(directory: Path) -> str:
    manifest = Manifest.load(directory / MANIFEST_FILE)
    lines = [
        f"version   {manifest.version}",
        f"directory {directory}",
        f"net       {manifest.net}  heads={manifest.heads} dk={manifest.key_dim} "
        f"dv={manifest.value_dim}  fusion={manifest.fusion}",
        f"state     {manifest.state_tensor_bytes:,} bytes per user"
        + (f"  channel {manifest.channel}" if manifest.channel else ""),
        f"catalogue {manifest.catalogue_items} items",
        "formats:",
    ]
    for name, status in manifest.formats.items():
        if status["status"] == "ok":
            size = status.get("bytes", 0) / 2**20
            lines.append(
                f"  {name:<12} ok      {status['seconds']:7.1f} s  {size:7.2f} MiB  "
                f"max |Δ| vs eager {status.get('max_abs_error', 0.0):.1e}"
                + (
                    f" (bf16 {status['bf16_max_abs_error']:.1e})"
                    if "bf16_max_abs_error" in status
                    else ""
                )
            )
        else:
            lines.append(
                f"  {name:<12} FAILED  {status['seconds']:7.1f} s  {status['error'][:200]}"
            )
    lines.append("files:")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        lines.append(
            f"  {path.relative_to(directory)!s:<28} {path.stat().st_size / 2**20:8.2f} MiB"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument(
        "--catalogue", type=Path, required=True, help="Parquet file or world directory"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="export root (gets <version>/, LATEST)"
    )
    parser.add_argument("--fusion", type=parse_fusion, default=None, help="e.g. click=1.0,like=0.2")
    parser.add_argument(
        "--formats",
        type=parse_formats,
        default=DEFAULT_FORMATS,
        help="comma list: torchscript,export,aoti",
    )
    parser.add_argument(
        "--precisions",
        type=parse_precisions,
        default=PRECISIONS,
        help="comma list: fp32 (always) and bf16 (a scorer with bfloat16 towers per format)",
    )
    parser.add_argument("--no-latest", action="store_true", help="do not update LATEST")
    parser.add_argument(
        "--split-scorer",
        action="store_true",
        help="ship the split scorer: item blocks of the first layers from projected tables, "
        "user blocks once per request (results/split_scorer.md says where it pays)",
    )
    args = parser.parse_args(argv)

    checkpoint = load_checkpoint(args.checkpoint)
    catalogue = Catalogue.load(catalogue_source(args.catalogue), checkpoint.spec)
    print(f"exporting {args.checkpoint} ({checkpoint.net_name}, {len(catalogue)} catalogue items)")
    try:
        directory = export_artifact(
            checkpoint,
            catalogue,
            args.out,
            fusion=args.fusion,
            formats=args.formats,
            update_latest=not args.no_latest,
            log=print,
            precisions=args.precisions,
            split_scorer=args.split_scorer,
        )
    except (ExportError, TypeError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(summarise(directory))
    if not args.no_latest:
        print(f"LATEST -> {directory.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
