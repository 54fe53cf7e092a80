"""Streaming training and evaluation (IFA §5.1): every batch is scored first, then trained on.

The stream is a world's requests in ``request_time`` order. For each batch the model's
predictions are recorded *before* the optimiser sees the batch's labels (prequential
evaluation), so every AUC is measured on requests the model has never trained on. AUC per
objective is over all real candidates: impression is scored by p_imp, action ``a`` by the joint
p_imp · p(a | imp), against the joint labels. The oracle AUC (the world's true probabilities on
the very same candidates) is reported beside it.

With ``--epochs`` > 1 the stream is replayed; only the first pass is on unseen data, so the
headline AUC is the first pass's (later passes are reported separately). ``--warmup`` excludes
the first fraction of batches of a pass from evaluation: every model starts at random, and those
batches say more about initialisation than about the model. ``--burn-in B`` trains B extra
passes over that warm-up prefix before the stream (nothing in it is evaluated), so the evaluated
rest of the stream meets a model trained longer, still on requests it has never seen.

The scoring pass and the training pass are one forward: no layer of these networks behaves
differently in train and eval mode (checked; a network with dropout or batch norm gets a
separate eval-mode forward), so the logits that are backpropagated are the pre-update scores.

Data parallel: ``torchrun --nproc_per_node=2 -m model.train ...`` runs DistributedDataParallel
over gloo on CPU. ``--batch-size`` is the *global* batch; each rank takes a disjoint contiguous
slice of every global batch, so the stream order and the gradient of each step (the average of
the ranks' gradients) match the single-process run (exactly when the slices hold equally many
candidates). Predictions are gathered from every rank, and rank 0 writes the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model.batch import Batch
from model.checkpoint import Checkpoint, save_checkpoint
from model.data import World, batches, load_world, spec_for_world, world_fingerprint
from model.features import DEFAULT_MAX_HISTORY, OBJECTIVES, FeatureSpec
from model.loss import esmm_loss, joint_probabilities
from model.metrics import bucketed_aucs, objective_aucs
from model.nets import NETS, build_net, config_of

# Layers whose output differs between train() and eval(); with none of them in a network, the
# forward pass that trains on a batch is also its (pre-update) evaluation, and we save a pass.
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class TrainSettings:
    world: Path
    net: str = "ifa"
    epochs: int = 1
    batch_size: int = 32
    """Global batch: requests per optimiser step over all ranks."""
    lr: float = 1e-3
    seed: int = 0
    max_history: int | None = DEFAULT_MAX_HISTORY
    """Keep only each request's most recent events (all models see the same truncation): the
    window the service keeps per user, recorded in the exported manifest. None: whole histories."""
    threads: int | None = None
    warmup: float = 0.0
    """Fraction of each pass's batches left out of evaluation (still trained on)."""
    burn_in: int = 0
    """Extra passes over the warm-up prefix before the streaming pass (never evaluated): more
    training on old requests, as a production model has had, without ever seeing a request
    that is evaluated before it is scored."""
    max_requests: int | None = None
    """Use only the first requests of the stream (quick runs and tests)."""
    net_overrides: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    save_predictions: bool = False
    progress: bool = True


@dataclass
class Predictions:
    """Per evaluated candidate, in stream order: what AUCs and buckets are computed from."""

    scores: np.ndarray  # (n, n_objectives) float32 p_imp, p_imp·p_a
    labels: np.ndarray  # (n, n_objectives) int8
    truth: np.ndarray  # (n, n_objectives) float32 true probabilities (NaN without ground truth)
    request_rows: np.ndarray  # (n,) int64 row of the request in the world

    @classmethod
    def empty(cls, n: int = len(OBJECTIVES)) -> Predictions:
        return cls(
            np.zeros((0, n), np.float32),
            np.zeros((0, n), np.int8),
            np.zeros((0, n), np.float32),
            np.zeros(0, np.int64),
        )

    @classmethod
    def concat(cls, parts: Sequence[Predictions]) -> Predictions:
        parts = [cls.empty(parts[0].scores.shape[1] if parts else len(OBJECTIVES)), *parts]
        scores, labels, truth, rows = (
            np.concatenate([getattr(p, name) for p in parts])
            for name in ("scores", "labels", "truth", "request_rows")
        )
        # Ranks interleave slices of every batch; a stable sort by request restores stream order.
        order = np.argsort(rows, kind="stable")
        return cls(scores[order], labels[order], truth[order], rows[order])


@dataclass
class RunResult:
    net: str
    seed: int
    world: str
    settings: dict[str, Any]
    config: dict[str, Any]
    auc: dict[str, float]
    """First pass, after warm-up: the headline numbers."""
    oracle_auc: dict[str, float]
    auc_by_pass: list[dict[str, float]]
    auc_second_half: dict[str, float]
    """First pass, requests in the second half of the stream only: the models after most of
    their training, less dominated by how fast each one starts."""
    history_edges: list[float]
    auc_by_history: list[dict[str, float]]
    oracle_by_history: list[dict[str, float]]
    losses: list[float]
    """Mean training loss of every global batch, in order, all passes."""
    samples_per_second: float
    """Requests per second of model time (forward, backward, update), summed over ranks."""
    candidates_per_second: float
    model_seconds: float
    wall_seconds: float
    n_requests: int
    n_eval_candidates: int
    n_parameters: int
    world_size: int = 1
    world_fingerprint: str | None = None
    """SHA-256 of the world's files (None for a world given only in memory)."""
    predictions: Predictions | None = field(default=None, repr=False)
    checkpoint: Checkpoint | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("predictions")
        data.pop("checkpoint")
        return data


# -- process setup ------------------------------------------------------------------------


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group (gloo, CPU) when there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_rows(n_requests: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Request rows of one rank, in stream order: its contiguous slice of every global batch.

    Every rank must take the same number of steps, so a last global batch smaller than the
    number of ranks is dropped (at most world_size - 1 requests).
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of {world_size} ranks")
    rows: list[np.ndarray] = []
    for start in range(0, n_requests, batch_size):
        chunk = np.arange(start, min(start + batch_size, n_requests))
        if len(chunk) < world_size:
            break
        rows.append(np.array_split(chunk, world_size)[rank])
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def history_edges(world: World) -> list[float]:
    """Bucket edges of request history length: the world's quintiles, the same for every run."""
    lengths = world.requests["history_end"] - world.requests["history_start"]
    inner = np.unique(np.quantile(lengths, [0.2, 0.4, 0.6, 0.8]).round().astype(np.int64))
    return [0.0, *(float(x) for x in inner if x > 0), math.inf]


# -- the stream ---------------------------------------------------------------------------


@dataclass
class PassRecord:
    predictions: list[Predictions] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    model_seconds: float = 0.0
    requests: int = 0
    candidates: int = 0


def run_pass(
    net: nn.Module,
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Any,
    rows: np.ndarray,
    local_batch: int,
    warmup_batches: int,
    bar: tqdm[Any] | None,
) -> PassRecord:
    """One pass over this rank's rows: per batch, record pre-update predictions, then train.

    ``net`` is the bare network, ``trainable`` the same one or its DDP wrapper.
    """
    record = PassRecord()
    separate_eval = any(isinstance(m, MODE_DEPENDENT) for m in net.modules())
    for step, (batch, truth) in enumerate(stream):
        batch_rows = rows[step * local_batch : step * local_batch + batch.size]
        started = time.perf_counter()
        if separate_eval:
            net.eval()
            with torch.no_grad():
                scored = net(batch)
            net.train()
        logits = trainable(batch)
        if not separate_eval:
            scored = logits.detach()
        assert batch.labels is not None
        loss = esmm_loss(logits, batch.labels, batch.candidate_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record.model_seconds += time.perf_counter() - started
        record.losses.append(float(loss.detach()))
        mask = batch.candidate_mask.numpy()
        record.requests += batch.size
        record.candidates += int(mask.sum())
        if step >= warmup_batches:
            record.predictions.append(_masked(batch, scored, truth, batch_rows, mask))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record.losses[-1]:.4f}", refresh=False)
    return record


def _masked(
    batch: Batch, scored: torch.Tensor, truth: np.ndarray, rows: np.ndarray, mask: np.ndarray
) -> Predictions:
    assert batch.labels is not None
    request_rows = np.broadcast_to(rows[:, None], mask.shape)
    return Predictions(
        scores=joint_probabilities(scored).numpy()[mask].astype(np.float32),
        labels=batch.labels.numpy()[mask].astype(np.int8),
        truth=truth[mask],
        request_rows=request_rows[mask].astype(np.int64),
    )


def train(settings: TrainSettings, world: World | None = None) -> RunResult:
    """Train ``settings.net`` on the stream of ``settings.world`` and evaluate it on the way.

    ``world`` may be passed already loaded. Under torchrun every rank returns the same metrics
    (predictions are all-gathered); only rank 0 writes ``settings.out``.
    """
    try:
        return _train(settings, world)
    finally:
        # Flushing denormals is this thread's floating-point state, not the caller's: leave it
        # as Python starts (code run after training, a property-test library for one, may
        # need subnormal floats).
        torch.set_flush_denormal(False)


def _train(settings: TrainSettings, world: World | None) -> RunResult:
    wall_started = time.perf_counter()
    rank, world_size = distributed()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    elif world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # Adam's second moments of rarely-hit embedding rows underflow into denormals, which x86
    # computes on ~100x slower; flushing them to zero changes no result worth a bit.
    torch.set_flush_denormal(True)
    set_seeds(settings.seed)
    world = world if world is not None else load_world(settings.world)
    spec = spec_for_world(world)
    net = build_net(settings.net, spec, **settings.net_overrides)
    net.train()
    trainable: nn.Module = net
    if world_size > 1:
        # IFA keeps a decay parameter that is unused without time decay.
        trainable = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)

    n_requests = world.n_requests
    if settings.max_requests is not None:
        n_requests = min(n_requests, settings.max_requests)
    rows = rank_rows(n_requests, settings.batch_size, rank, world_size)
    local_batch = settings.batch_size // world_size
    n_batches = math.ceil(len(rows) / local_batch)
    warmup_batches = int(settings.warmup * n_batches)

    # Burn-in: the warm-up prefix again and again; nothing in it is ever evaluated.
    prefix = rows[: warmup_batches * local_batch]
    burn_in: list[PassRecord] = []
    for _ in range(settings.burn_in if len(prefix) else 0):
        stream = batches(
            world, spec, local_batch, settings.max_history, with_truth=True, request_rows=prefix
        )
        burn_in.append(
            run_pass(net, trainable, optimizer, stream, prefix, local_batch, warmup_batches, None)
        )

    records: list[PassRecord] = []
    for epoch in range(settings.epochs):
        stream = batches(
            world, spec, local_batch, settings.max_history, with_truth=True, request_rows=rows
        )
        bar = (
            tqdm(
                total=n_batches,
                desc=f"{settings.net} pass {epoch + 1}",
                mininterval=2.0,
                file=sys.stderr,
            )
            if settings.progress and rank == 0
            else None
        )
        records.append(
            run_pass(net, trainable, optimizer, stream, rows, local_batch, warmup_batches, bar)
        )
        if bar is not None:
            bar.close()

    gathered = gather((burn_in, records))
    result = _summarise(settings, world, spec, net, gathered, wall_started, world_size)
    if rank == 0 and settings.out is not None:
        write_run(result, settings.out)
    return result


def _summarise(
    settings: TrainSettings,
    world: World,
    spec: FeatureSpec,
    net: nn.Module,
    gathered: list[tuple[list[PassRecord], list[PassRecord]]],
    wall_started: float,
    world_size: int,
) -> RunResult:
    """Metrics from every rank's (burn-in passes, streaming passes)."""
    passes = [
        Predictions.concat([p for _, ranks in gathered for p in ranks[epoch].predictions])
        for epoch in range(settings.epochs)
    ]
    first = passes[0]
    objectives = spec.objectives
    auc_by_pass = [objective_aucs(p.labels, p.scores, objectives) for p in passes]
    oracle = (
        objective_aucs(first.labels, first.truth, objectives)
        if world.has_truth
        else {name: math.nan for name in objectives}
    )
    lengths = (world.requests["history_end"] - world.requests["history_start"])[first.request_rows]
    stream_length = min(world.n_requests, settings.max_requests or world.n_requests)
    late = first.request_rows >= stream_length // 2
    edges = history_edges(world)
    every_rank = [burn + ranks for burn, ranks in gathered]
    # Losses: the mean over ranks of each global step (ranks take equal steps), burn-in first.
    losses = np.mean([[loss for r in ranks for loss in r.losses] for ranks in every_rank], axis=0)
    model_seconds = max(sum(r.model_seconds for r in ranks) for ranks in every_rank)
    requests = sum(r.requests for ranks in every_rank for r in ranks)
    candidates = sum(r.candidates for ranks in every_rank for r in ranks)
    streamed = sum(r.requests for _, ranks in gathered for r in ranks)
    metadata_settings = {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()
    }
    result = RunResult(
        net=settings.net,
        seed=settings.seed,
        world=str(settings.world),
        settings=metadata_settings,
        config=config_of(net),
        auc=auc_by_pass[0],
        oracle_auc=oracle,
        auc_by_pass=auc_by_pass,
        auc_second_half=objective_aucs(first.labels[late], first.scores[late], objectives),
        history_edges=edges,
        auc_by_history=bucketed_aucs(first.labels, first.scores, lengths, edges, objectives),
        oracle_by_history=(
            bucketed_aucs(first.labels, first.truth, lengths, edges, objectives)
            if world.has_truth
            else []
        ),
        losses=[float(x) for x in losses],
        samples_per_second=requests / model_seconds if model_seconds else math.nan,
        candidates_per_second=candidates / model_seconds if model_seconds else math.nan,
        model_seconds=model_seconds,
        wall_seconds=time.perf_counter() - wall_started,
        n_requests=streamed // settings.epochs,
        n_eval_candidates=len(first.request_rows),
        n_parameters=sum(p.numel() for p in net.parameters()),
        world_size=world_size,
        world_fingerprint=world_fingerprint(settings.world),
        predictions=first,
    )
    metadata = {k: v for k, v in result.to_json().items() if k not in ("losses", "config")}
    result.checkpoint = Checkpoint(settings.net, spec, net, metadata)
    return result


def write_run(result: RunResult, out: Path) -> None:
    """checkpoint.pt, metrics.json and (if asked) predictions.npz under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    assert result.checkpoint is not None
    save_checkpoint(result.checkpoint, out / "checkpoint.pt")
    (out / "metrics.json").write_text(
        json.dumps(result.to_json(), indent=2, default=_json_default) + "\n"
    )
    if result.settings.get("save_predictions") and result.predictions is not None:
        np.savez_compressed(out / "predictions.npz", **asdict(result.predictions))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary_table(result: RunResult) -> str:
    """The end-of-run summary: AUC beside the oracle, then throughput."""
    lines = [
        f"{result.net} on {result.world} (seed {result.seed}, {result.world_size} process(es)): "
        f"{result.n_requests} requests, {result.n_eval_candidates} candidates evaluated",
        "",
        "| objective  | AUC    | oracle AUC |",
        "|------------|--------|------------|",
    ]
    for name in result.auc:
        lines.append(f"| {name:<10} | {result.auc[name]:.4f} | {result.oracle_auc[name]:.4f}     |")
    lines += [
        "",
        f"training throughput: {result.samples_per_second:,.1f} requests/s, "
        f"{result.candidates_per_second:,.0f} candidates/s "
        f"(model time {result.model_seconds:.1f} s, wall {result.wall_seconds:.1f} s)",
        f"loss: first batch {result.losses[0]:.4f}, last batch {result.losses[-1]:.4f}",
    ]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parse as JSON where they can (``top_k=100``, ``x=true``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def parse_args(argv: Sequence[str] | None = None) -> TrainSettings:
    parser = argparse.ArgumentParser(
        prog="python -m model.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--world", type=Path, required=True, help="world directory (model.world)")
    parser.add_argument("--net", default="ifa", choices=sorted(NETS))
    parser.add_argument("--epochs", type=int, default=1, help="passes over the stream")
    parser.add_argument("--batch-size", type=int, default=32, help="global requests per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="run directory for checkpoint and metrics")
    parser.add_argument(
        "--max-history",
        type=int,
        default=DEFAULT_MAX_HISTORY,
        help="keep each request's latest N events, the window the service keeps "
        f"(default {DEFAULT_MAX_HISTORY}; 0 keeps whole histories)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads per process")
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="fraction of batches not evaluated"
    )
    parser.add_argument(
        "--burn-in", type=int, default=0, help="extra passes over the warm-up prefix first"
    )
    parser.add_argument("--max-requests", type=int, help="use only the stream's first requests")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="net config fields"
    )
    parser.add_argument("--save-predictions", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return TrainSettings(
        world=args.world,
        net=args.net,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_history=args.max_history or None,
        threads=args.threads,
        warmup=args.warmup,
        burn_in=args.burn_in,
        max_requests=args.max_requests,
        net_overrides=parse_overrides(args.set),
        out=args.out,
        save_predictions=args.save_predictions,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    result = train(settings)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(summary_table(result))
        if settings.out is not None:
            print(f"checkpoint and metrics in {settings.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
