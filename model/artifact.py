"""The serving artefact: a versioned directory of programs, and the one interface to load it.

Layout written by :mod:`model.export` (DESIGN §2: the model is served as two programs)::

    DIR/LATEST                      text: the version the service should load
    DIR/<version>/manifest.json     :class:`Manifest`
    DIR/<version>/catalogue.parquet :class:`model.catalogue.Catalogue`
    DIR/<version>/checkpoint.pt     the checkpoint (the "eager" format rebuilds from it)
    DIR/<version>/torchscript/{encoder,scorer}.pt    torch.jit.script + torch.jit.save
    DIR/<version>/export/{encoder,scorer}.pt2        torch.export.save
    DIR/<version>/aoti/{encoder,scorer}.pt2          AOTInductor packages

Every format loads into the same :class:`ServingModel`: ``encode`` turns one user's events into
the additive state (S, z) and ``score`` reads a cached state for one candidate set, so the
service does not care which format it runs.

Edge sizes. The programs are exported with a dynamic event count N ≥ 0 and candidate count
M ≥ 1 (``torch.export.Dim(min=0)`` / ``Dim(min=1)``), so N = 0 and M = 1 run through the
programs themselves in every format, with no special case in the loader; the exporter verifies
both against eager before it ships a format. An empty history encodes to exactly zeros.
"""

from __future__ import annotations

import hashlib
import json
import platform
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from model.catalogue import Catalogue
from model.features import DEFAULT_MAX_HISTORY, FeatureSpec
from model.linear_attention import fold_in

FORMATS: tuple[str, ...] = ("torchscript", "export", "aoti", "eager")
"""Program formats an artefact holds; "eager" rebuilds from the checkpoint."""

AUTO_FORMAT = "auto"
"""What :func:`load_artifact` also accepts: the fastest format that can run here
(:func:`resolve_format`)."""

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""Scorer precisions: "bf16" runs the objective towers in bfloat16 (model.serving.bf16_scorer);
the encoder is always fp32."""
AUTO_PRECISION = "auto"
"""What :func:`load_artifact` also accepts: bf16 where the CPU has bfloat16 arithmetic and the
artefact holds a bf16 scorer in the chosen format, fp32 otherwise (:func:`resolve_precision`)."""

MANIFEST_FILE = "manifest.json"
CATALOGUE_FILE = "catalogue.parquet"
CHECKPOINT_FILE = "checkpoint.pt"
LATEST_FILE = "LATEST"
PROGRAM_FILES: dict[str, dict[str, str]] = {
    "torchscript": {
        "encoder": "torchscript/encoder.pt",
        "scorer": "torchscript/scorer.pt",
        "scorer_bf16": "torchscript/scorer-bf16.pt",
    },
    "export": {
        "encoder": "export/encoder.pt2",
        "scorer": "export/scorer.pt2",
        "scorer_bf16": "export/scorer-bf16.pt2",
    },
    "aoti": {
        "encoder": "aoti/encoder.pt2",
        "scorer": "aoti/scorer.pt2",
        "scorer_bf16": "aoti/scorer-bf16.pt2",
    },
    "eager": {"checkpoint": CHECKPOINT_FILE},
}
"""Program files by format and role; a format's bf16 scorer ("scorer_bf16") is built only
where the export asked for bf16."""
SCORER_ROLES: dict[str, str] = {"fp32": "scorer", "bf16": "scorer_bf16"}
MANIFEST_SCHEMA = 1

ENCODE_CHUNK = 1 << 14
"""Events per encoder call. The state is a sum over events (each discounted to the same
reference time), so a long history is encoded in chunks and the contributions added: memory
stays bounded for any N, and 16k-event chunks stay cache-resident (measured ≈ 1.5× faster than
one call at N = 1e5 on the development machine)."""

# TorchScript is deprecated in this PyTorch and says so on every script/save/load. Only these
# exact messages are silenced, only around our own jit calls.
_TORCHSCRIPT_DEPRECATION = (
    r"`torch\.jit\.(script|script_method|save|load)` is deprecated\. Please switch to"
)


@contextmanager
def quiet_torchscript_deprecation() -> Iterator[None]:
    """Silence the TorchScript deprecation warnings (and nothing else) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=_TORCHSCRIPT_DEPRECATION, category=DeprecationWarning
        )
        yield


# -- the host: what compiled programs and bf16 need -------------------------------------------


def compile_target() -> dict[str, str]:
    """What an AOTInductor package compiled on this machine depends on: the vector ISA inductor
    generated code for, the machine architecture and the torch version."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_supports_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16) for oneDNN to use."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


# -- manifest ---------------------------------------------------------------------------------


@dataclass
class Manifest:
    """What an artefact computes and where its files are (``manifest.json``)."""

    version: str
    """``ifa-<12 hex>``: hash of net, config, spec, fusion and weights (:func:`model_version`)."""
    net: str
    net_config: dict[str, Any]
    spec: dict[str, Any]
    """``FeatureSpec.to_dict()``; :meth:`feature_spec` rebuilds it."""
    objectives: list[str]
    """Column order of the scorer's probabilities."""
    actions: list[str]
    """Event action vocabulary (raw action value = index)."""
    fusion: dict[str, float]
    """score = p(impression) · Σ_a fusion[a] · p(a | impression)."""
    heads: int
    key_dim: int
    """Rows of S per head: the key dim, plus the exact-match channel's slots where the net has
    one (the state's shape is (heads, key_dim, value_dim) and (heads, key_dim))."""
    value_dim: int
    decay_rates: list[float]
    """(H,) per-second exponential decay of the state; all zeros when decay is off."""
    dtype: str
    files: dict[str, dict[str, str]]
    """Per built format, role -> path relative to the artefact directory ("scorer_bf16" where
    the bf16 scorer was built; "eager" builds it at load time from the checkpoint)."""
    formats: dict[str, dict[str, Any]]
    """Per requested format: status ("ok" | "failed"), seconds, bytes, max_abs_error, error."""
    created_at: str
    training: dict[str, Any]
    """The checkpoint's metadata (world, seed, metrics ...)."""
    torch_version: str
    catalogue_file: str = CATALOGUE_FILE
    catalogue_items: int = 0
    checkpoint_file: str = CHECKPOINT_FILE
    schema: int = MANIFEST_SCHEMA
    state_version: str | None = None
    """``state-<12 hex>``: hash of what a user state depends on, the encoder (net, config, spec,
    encoder weights) and the catalogue (:func:`state_version`); fusion and scorer-only weights are
    not in it, so re-exporting with new fusion weights keeps every cached state. None in
    artefacts older than it: :func:`artifact_state_version` derives one from the files."""
    state_tensor_bytes: int = 0
    """Bytes of one user's state tensors S and z (float32); 0 in artefacts older than it."""
    channel: dict[str, Any] | None = None
    """The exact-match channel: its item fields and one-hot slots per field; None without."""
    scorer: str = "network"
    """The scorer programs' layout: "network" (the trained network's scorer) or "split"
    (:class:`model.split_scorer.SplitScorer`, ``python -m model.export --split-scorer``)."""
    max_history: int | None = DEFAULT_MAX_HISTORY
    """The history window the model was trained with (most recent events per request); the
    service keeps the same window per user unless configured otherwise. None: trained on whole
    histories (the service then keeps its own default cap, as storage must stay bounded)."""

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.spec)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.from_json(path.read_text())


def plain_data(value: Any) -> Any:
    """JSON-compatible copy of metadata (numpy scalars, tensors and paths made plain).

    Checkpoints are read with ``torch.load(weights_only=True)``, which refuses numpy scalars, so
    the artefact's checkpoint copy and manifest both carry metadata in this form.
    """
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: object) -> object:
    """Checkpoint metadata may hold numpy scalars, tensors or paths: store them as plain data."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | Tensor):
        return value.tolist()
    return str(value)


def model_version(
    net_name: str,
    net_config: Mapping[str, Any],
    spec: FeatureSpec,
    fusion: Mapping[str, float],
    state_dict: Mapping[str, Tensor],
) -> str:
    """``ifa-<12 hex>``: stable for the same model, new whenever weights, config, spec or fusion
    change. Creation time and program formats are not part of it: they do not change scores."""
    digest = hashlib.sha256()
    described = {
        "net": net_name,
        "config": dict(net_config),
        "spec": spec.to_dict(),
        "fusion": {k: float(v) for k, v in sorted(fusion.items()) if float(v) != 0.0},
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return f"{net_name}-{digest.hexdigest()[:12]}"


def state_version(
    net_name: str,
    net_config: Mapping[str, Any],
    spec: FeatureSpec,
    state_dict: Mapping[str, Tensor],
    catalogue: Catalogue,
) -> str:
    """``state-<12 hex>``: changes whenever a cached user state would: the encoder's weights
    (``encoder.*``, which include the event embeddings it reads), the net's config and feature
    spec, and the catalogue (events are featurised through it). Not the fusion weights, not the
    scorer's weights."""
    digest = hashlib.sha256()
    described = {"net": net_name, "config": dict(net_config), "spec": spec.to_dict()}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name in sorted(k for k in state_dict if k.startswith("encoder.")):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    for column in sorted(catalogue.columns):
        values = np.ascontiguousarray(catalogue.columns[column], dtype=np.int64)
        digest.update(f"catalogue|{column}|{values.size}|".encode())
        digest.update(values.tobytes())
    return f"state-{digest.hexdigest()[:12]}"


def artifact_state_version(manifest: Manifest, directory: Path, program_format: str) -> str:
    """The manifest's state version, or for an artefact exported before it had one a hash of the
    encoder program's and the catalogue's files (conservative: a re-export changes it)."""
    if manifest.state_version:
        return manifest.state_version
    digest = hashlib.sha256(b"files|")
    role = "checkpoint" if program_format == "eager" else "encoder"
    for name in (manifest.files[program_format][role], manifest.catalogue_file):
        digest.update((directory / name).read_bytes())
    return f"state-{digest.hexdigest()[:12]}"


# -- the serving interface --------------------------------------------------------------------


@runtime_checkable
class ServingModel(Protocol):
    """One loaded artefact, whatever its program format.

    Shapes: N events, M candidates, H heads, dk key dim, dv value dim; F_event, F_item, F_user
    fields of the manifest's spec. All calls are unbatched (one user) and run without autograd.
    """

    @property
    def manifest(self) -> Manifest: ...

    @property
    def spec(self) -> FeatureSpec: ...

    @property
    def catalogue(self) -> Catalogue: ...

    @property
    def program_format(self) -> str: ...

    @property
    def precision(self) -> str:
        """The scorer's: "fp32", or "bf16" (its objective towers in bfloat16)."""
        ...

    @property
    def decay_rates(self) -> Tensor:
        """(H,) float32 per-second decay rates (zeros without decay), for advancing a state."""
        ...

    def empty_state(self) -> tuple[Tensor, Tensor]:
        """The state of an empty history: S (H, dk, dv) and z (H, dk), float32 zeros."""
        ...

    def encode(
        self, events: Tensor, event_times: Tensor, reference_time: float
    ) -> tuple[Tensor, Tensor]:
        """events (N, F_event) int64 rows, event_times (N,) float64 unix seconds ->
        the events' additive state (S (H, dk, dv), z (H, dk)), discounted to ``reference_time``
        when the model decays (otherwise reference_time is ignored). N = 0 gives zeros."""
        ...

    def score(
        self, user: Tensor, candidates: Tensor, s: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor]:
        """user (F_user,) int64, candidates (M, F_item) int64 with M ≥ 1, a state ->
        (probabilities (M, 1 + A): p(impression), then p(action | impression) per action;
        score (M,) = p(impression) · Σ_a fusion_a · p(a | impression))."""
        ...


Program = Callable[..., Any]
"""A loaded encoder or scorer: an nn.Module, a ScriptModule, an unlifted exported module or an
AOTInductor runner. All take and return the same tensors (:mod:`model.serving`)."""


class ProgramModel:
    """:class:`ServingModel` over an encoder and a scorer program of any format.

    Inputs are checked here (shapes, dtypes, row ranges) because compiled formats do not all
    check them, and an out-of-range embedding row in a compiled program is memory corruption,
    not an exception.
    """

    def __init__(
        self,
        manifest: Manifest,
        program_format: str,
        encoder: Program,
        scorer: Program,
        catalogue: Catalogue,
        path: Path,
        precision: str = "fp32",
    ):
        self._manifest = manifest
        self._format = program_format
        self._precision = precision
        self._encoder = encoder
        self._scorer = scorer
        self._catalogue = catalogue
        self.path = path
        self._spec = manifest.feature_spec()
        self._decay = torch.tensor(manifest.decay_rates, dtype=torch.float32)
        self._event_rows = torch.tensor([f.rows for f in self._spec.event_fields])
        self._item_rows = torch.tensor([f.rows for f in self._spec.item_fields])
        self._user_rows = torch.tensor([f.rows for f in self._spec.user_fields])
        self._state_shape = (manifest.heads, manifest.key_dim, manifest.value_dim)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def spec(self) -> FeatureSpec:
        return self._spec

    @property
    def catalogue(self) -> Catalogue:
        return self._catalogue

    @property
    def program_format(self) -> str:
        return self._format

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def version(self) -> str:
        return self._manifest.version

    @property
    def decay_rates(self) -> Tensor:
        return self._decay.clone()

    def empty_state(self) -> tuple[Tensor, Tensor]:
        h, dk, dv = self._state_shape
        return torch.zeros(h, dk, dv), torch.zeros(h, dk)

    def encode(
        self, events: Tensor, event_times: Tensor, reference_time: float
    ) -> tuple[Tensor, Tensor]:
        events = _check_rows("events", events, self._event_rows, matrix=True)
        event_times = event_times.to(torch.float64).reshape(-1)
        if event_times.shape[0] != events.shape[0]:
            raise ValueError(
                f"event_times has {event_times.shape[0]} entries for {events.shape[0]} events"
            )
        reference = torch.tensor(float(reference_time), dtype=torch.float64)
        with torch.no_grad():
            if events.shape[0] <= ENCODE_CHUNK:
                return _float_pair(self._encoder(events, event_times, reference))
            state = self.empty_state()
            for start in range(0, events.shape[0], ENCODE_CHUNK):
                stop = start + ENCODE_CHUNK
                part = _float_pair(
                    self._encoder(events[start:stop], event_times[start:stop], reference)
                )
                state = fold_in(state, part)
            return state

    def score(
        self, user: Tensor, candidates: Tensor, s: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor]:
        user = _check_rows("user", user, self._user_rows, matrix=False)
        candidates = _check_rows("candidates", candidates, self._item_rows, matrix=True)
        if candidates.shape[0] == 0:
            raise ValueError("score needs at least one candidate (M >= 1)")
        h, dk, dv = self._state_shape
        if tuple(s.shape) != (h, dk, dv) or tuple(z.shape) != (h, dk):
            raise ValueError(
                f"state shapes {tuple(s.shape)}, {tuple(z.shape)}; "
                f"expected {(h, dk, dv)}, {(h, dk)}"
            )
        s = s.to(torch.float32).contiguous()
        z = z.to(torch.float32).contiguous()
        with torch.no_grad():
            return _float_pair(self._scorer(user, candidates, s, z))

    def __repr__(self) -> str:
        return (
            f"ProgramModel(version={self.version!r}, format={self._format!r}, "
            f"precision={self._precision!r}, path={self.path})"
        )


def _float_pair(outputs: Any) -> tuple[Tensor, Tensor]:
    """The two output tensors in float32, whatever a program hands back."""
    first, second = outputs
    return first.float(), second.float()


def _check_rows(name: str, rows: Tensor, bounds: Tensor, matrix: bool) -> Tensor:
    """rows (…, F) of embedding indices, each column below its field's table size."""
    if rows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of embedding rows, got {rows.dtype}")
    width = bounds.shape[0]
    expected = 2 if matrix else 1
    if rows.dim() != expected or rows.shape[-1] != width:
        shape = "(n, " + str(width) + ")" if matrix else "(" + str(width) + ",)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(rows.shape)}")
    rows = rows.to(torch.int64).contiguous()
    if rows.numel() and bool(((rows < 0) | (rows >= bounds)).any()):
        raise ValueError(f"{name} holds embedding rows outside the spec's tables")
    return rows


# -- loading ----------------------------------------------------------------------------------


def resolve_artifact_dir(path: Path) -> Path:
    """An artefact directory itself, or the version named by ``path/LATEST``."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        version = latest.read_text().strip()
        if not version or Path(version).name != version or version.startswith("."):
            raise ValueError(f"{latest} names no valid version: {version!r}")
        resolved = path / version
        if not (resolved / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"{latest} names {version!r} but {resolved} has no manifest")
        return resolved
    raise FileNotFoundError(f"{path} holds neither {MANIFEST_FILE} nor {LATEST_FILE}")


def load_manifest(path: Path) -> Manifest:
    return Manifest.load(resolve_artifact_dir(path) / MANIFEST_FILE)


def load_catalogue(path: Path) -> Catalogue:
    """The catalogue of an artefact (directory or its parent with LATEST)."""
    directory = resolve_artifact_dir(path)
    manifest = Manifest.load(directory / MANIFEST_FILE)
    return Catalogue.load(directory / manifest.catalogue_file, manifest.feature_spec())


def aoti_matches_host(manifest: Manifest) -> bool:
    """Whether the artefact's AOTInductor programs were compiled for a machine like this one."""
    status = manifest.formats.get("aoti", {})
    return "aoti" in manifest.files and status.get("compiled_for") == compile_target()


def resolve_format(manifest: Manifest, program_format: str) -> str:
    """The concrete format for a requested one: "auto" is AOTInductor where its programs match
    this machine, TorchScript otherwise. AOTInductor was the fastest format for both programs in
    results/model_bench.md."""
    if program_format != AUTO_FORMAT:
        return program_format
    return "aoti" if aoti_matches_host(manifest) else "torchscript"


def has_bf16_scorer(manifest: Manifest, program_format: str) -> bool:
    """Whether the artefact can score in bf16 in this format (eager builds it at load)."""
    if program_format == "eager":
        return "eager" in manifest.files
    return SCORER_ROLES["bf16"] in manifest.files.get(program_format, {})


def resolve_precision(manifest: Manifest, program_format: str, precision: str) -> str:
    """The concrete precision for a requested one: "auto" is bf16 where the CPU has bfloat16
    arithmetic and the artefact a bf16 scorer in ``program_format``, fp32 otherwise. bf16 was
    accepted on quality (AUC within 0.001, top-50 overlap ≥ 0.95: results/precision.md)."""
    if precision != AUTO_PRECISION:
        return precision
    if cpu_supports_bf16() and has_bf16_scorer(manifest, program_format):
        return "bf16"
    return "fp32"


def check_precision(manifest: Manifest, program_format: str, precision: str) -> None:
    """Raise ``ValueError`` with what to do instead where ``precision`` cannot run."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {[*PRECISIONS, AUTO_PRECISION]}"
        )
    if precision == "fp32":
        return
    if not cpu_supports_bf16():
        raise ValueError(
            "precision bf16 needs a CPU with bfloat16 instructions (AVX512-BF16 or AMX-BF16); "
            "this CPU has neither: use precision fp32 (or auto, which picks it here)"
        )
    if program_format in manifest.files and not has_bf16_scorer(manifest, program_format):
        raise ValueError(
            f"artefact {manifest.version} has no bf16 scorer in format {program_format!r} (it "
            f"was exported without it): export again with `python -m model.export --precisions "
            f"fp32,bf16`, or use precision fp32"
        )


def load_artifact(
    path: Path, program_format: str = "torchscript", precision: str = "fp32", runners: int = 1
) -> ServingModel:
    """Load an artefact's programs in one format ("auto": see :func:`resolve_format`), its
    scorer in ``precision`` ("fp32", "bf16" where :func:`check_precision` allows it, or "auto":
    see :func:`resolve_precision`); ``runners`` is how many threads may run each program at once
    (AOTInductor only: :func:`load_program_files`).

    ``path`` is an artefact directory or an export root with ``LATEST``. Raises ``ValueError``
    for a format that does not exist or that this artefact could not build (with the reason the
    exporter recorded), and for a precision that cannot run here.
    """
    if program_format not in (*FORMATS, AUTO_FORMAT):
        raise ValueError(
            f"unknown program format {program_format!r}; expected one of {[*FORMATS, AUTO_FORMAT]}"
        )
    directory = resolve_artifact_dir(path)
    manifest = Manifest.load(directory / MANIFEST_FILE)
    program_format = resolve_format(manifest, program_format)
    precision = resolve_precision(manifest, program_format, precision)
    check_precision(manifest, program_format, precision)
    if program_format not in manifest.files:
        status = manifest.formats.get(program_format)
        reason = (
            f"its export failed: {status.get('error')}"
            if status and status.get("status") == "failed"
            else "it was not exported"
        )
        raise ValueError(
            f"artefact {manifest.version} has no {program_format!r} programs ({reason}); "
            f"available: {sorted(manifest.files)}"
        )
    encoder, scorer = load_programs(directory, manifest, program_format, precision, runners)
    catalogue = Catalogue.load(directory / manifest.catalogue_file, manifest.feature_spec())
    manifest.state_version = artifact_state_version(manifest, directory, program_format)
    return ProgramModel(manifest, program_format, encoder, scorer, catalogue, directory, precision)


def load_programs(
    directory: Path,
    manifest: Manifest,
    program_format: str,
    precision: str = "fp32",
    runners: int = 1,
) -> tuple[Program, Program]:
    """The (encoder, scorer) callables of one format listed in ``manifest.files``."""
    files = {role: directory / name for role, name in manifest.files[program_format].items()}
    return load_program_files(files, program_format, manifest.fusion, precision, runners)


def load_program_files(
    files: Mapping[str, Path],
    program_format: str,
    fusion: Mapping[str, float],
    precision: str = "fp32",
    runners: int = 1,
) -> tuple[Program, Program]:
    """(encoder, scorer) from files by role ("encoder", "scorer", "scorer_bf16"; "checkpoint"
    for eager), the scorer of ``precision``.

    torch's AOTInductor container gives each call a model instance (runner) of its own and
    makes a caller wait while none is free (``aoti_runtime/model_container.h``), so each program
    gets ``runners`` of them: one per thread that calls it (the service's event loop and its
    model threads). Runners share the program's weights; each adds only its activation buffers
    (under 1 MiB for the test model: ``python -m service.runner_bench``). The other formats run
    concurrent calls as they are."""
    if program_format == "eager":
        # Imported here: the compiled formats must not need the network code to load.
        from model.checkpoint import load_checkpoint
        from model.nets.ifa import IFA
        from model.serving import serving_programs

        checkpoint = load_checkpoint(files["checkpoint"])
        if not isinstance(checkpoint.net, IFA):
            raise TypeError(f"eager serving needs an IFA checkpoint, got {checkpoint.net_name}")
        return serving_programs(checkpoint.net, fusion, precision)
    scorer_file = str(files[SCORER_ROLES[precision]])
    if program_format == "torchscript":
        with quiet_torchscript_deprecation():
            encoder_ts = torch.jit.load(str(files["encoder"]), map_location="cpu")
            scorer_ts = torch.jit.load(scorer_file, map_location="cpu")
        return encoder_ts.eval(), scorer_ts.eval()
    if program_format == "export":
        return _exported_module(files["encoder"]), _exported_module(Path(scorer_file))
    if program_format == "aoti":
        from torch._inductor.package import load_package

        return (
            load_package(str(files["encoder"]), num_runners=runners),
            load_package(scorer_file, num_runners=runners),
        )
    raise ValueError(f"unknown program format {program_format!r}; expected one of {list(FORMATS)}")


def _exported_module(path: Path) -> nn.Module:
    program = torch.export.load(str(path))
    return program.module()
