"""Is bf16 serving good enough, and is it faster? ``python -m model.precision``.

bf16 is accepted only with its quality measured on a trained model and requests it never saw:

1. IFA is trained (the streaming protocol of :mod:`model.train`) on the first
   ``--train-share`` of the world's requests and exported (TorchScript and AOTInductor, each
   with its fp32 and its bf16 scorer, :func:`model.serving.bf16_scorer`);
2. every held-out request (the rest of the stream) is served through the exported programs as
   the service serves it (the format "auto" picks here), once with the fp32 scorer and once with
   the bf16 one; the encoder, and so the state, is fp32 in both;
3. the two are compared: pooled AUC per objective on the requests' own candidates (bf16 must be
   within :data:`MAX_AUC_DROP` of fp32), and the overlap of the top 50 by serving score when each
   held-out user and state is scored against 1,000 catalogue items (mean at least
   :data:`MIN_TOP_OVERLAP`); the scorers of each format and precision are timed side by side at
   M = 1000.

Writes ``<out>.md`` and ``<out>.json`` (default ``results/precision``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import ServingModel, cpu_supports_bf16, load_artifact
from model.catalogue import Catalogue
from model.data import load_world, request_stream
from model.demo import DEMO_TRAINING, DEMO_WORLD, ensure_world, world_identity
from model.export import catalogue_source, export_artifact
from model.features import OBJECTIVES
from model.metrics import objective_aucs
from model.train import train

MAX_AUC_DROP = 0.001
MIN_TOP_OVERLAP = 0.95
TOP = 50
TIMING_CANDIDATES = 1000
TIMING_EVENTS = 10_000


def serve(model: ServingModel, request: Any, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the service computes for a request: (M, 4) p(impression) and
    p(impression)·p(action | impression) of its own candidates, and the (P,) serving scores of
    a production-sized candidate set ``pool`` (P, F_item) for the same user and state."""
    s, z = model.encode(
        torch.from_numpy(request.events),
        # A copy: the world's timestamps are a read-only view of its Parquet column.
        torch.from_numpy(np.array(request.event_times, dtype=np.float64)),
        request.request_time,
    )
    user = torch.from_numpy(request.user)
    probabilities, _ = model.score(user, torch.from_numpy(request.candidates), s, z)
    p = probabilities.numpy().astype(np.float64)
    _, pool_scores = model.score(user, torch.from_numpy(pool), s, z)
    return np.concatenate([p[:, :1], p[:, :1] * p[:, 1:]], axis=1), pool_scores.numpy()


def candidate_pool(catalogue: Catalogue, size: int, seed: int = 0) -> np.ndarray:
    """(size, F_item) rows of distinct catalogue items: the world's requests hold only tens of
    candidates, too few for a top-50 comparison to mean anything."""
    ids = np.asarray(catalogue.columns["item_id"])
    chosen = np.random.default_rng(seed).choice(ids, size=min(size, ids.size), replace=False)
    rows, _ = catalogue.rows(chosen)
    return rows


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP) -> float:
    """Share of the top ``k`` of ``a`` that is also in the top ``k`` of ``b``."""
    k = min(k, a.size)
    return len(set(np.argsort(-a)[:k].tolist()) & set(np.argsort(-b)[:k].tolist())) / k


def time_ms(call: Any, repeats: int = 30) -> float:
    for _ in range(3):
        call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def timings(models: dict[tuple[str, str], ServingModel]) -> dict[str, dict[str, float]]:
    """Median ms of the scorer at M = 1000 per format and precision, measured alternately so
    that machine noise hits all alike."""
    any_model = next(iter(models.values()))
    spec = any_model.spec
    generator = torch.Generator().manual_seed(0)

    def rows(fields: Sequence[Any], count: int) -> torch.Tensor:
        return torch.stack(
            [torch.randint(2, f.rows, (count,), generator=generator) for f in fields], dim=1
        )

    user = rows(spec.user_fields, 1)[0]
    candidates = rows(spec.item_fields, TIMING_CANDIDATES)
    events = rows(spec.event_fields, TIMING_EVENTS)
    event_times = torch.linspace(1.7e9, 1.7e9 + 1e6, TIMING_EVENTS, dtype=torch.float64)
    s, z = any_model.encode(events, event_times, 1.7e9 + 1e6)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    for _ in range(5):
        for key, model in models.items():
            samples[key].append(time_ms(lambda m=model: m.score(user, candidates, s, z)))
    by_format: dict[str, dict[str, float]] = {}
    for (program_format, precision), values in samples.items():
        by_format.setdefault(program_format, {})[precision] = min(values)
    return by_format


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--world", type=Path, default=DEMO_WORLD)
    parser.add_argument("--train-share", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/precision"))
    args = parser.parse_args(argv)
    if not cpu_supports_bf16():
        print(
            "this CPU has no bf16 instructions: bf16 serving is refused here, nothing to measure",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    started = time.time()
    preset, seed = world_identity(args.world)
    ensure_world(args.world, preset, seed)
    world = load_world(args.world)
    n_train = int(args.train_share * world.n_requests)
    with tempfile.TemporaryDirectory() as scratch:
        settings = replace(
            DEMO_TRAINING,
            world=args.world,
            epochs=args.epochs,
            threads=args.threads,
            max_requests=n_train,
            out=Path(scratch) / "run",
            progress=False,
        )
        result = train(settings, world=world)
        assert result.checkpoint is not None
        catalogue = Catalogue.load(catalogue_source(args.world), result.checkpoint.spec)
        root = Path(scratch) / "artifact"
        export_artifact(result.checkpoint, catalogue, root, formats=("torchscript", "aoti"))
        # Quality as the service serves: the format "auto" picks on this machine.
        models = {p: load_artifact(root, "auto", p) for p in ("fp32", "bf16")}
        served_format = models["fp32"].program_format
        formats = sorted({"torchscript", served_format})
        timed = {(f, p): load_artifact(root, f, p) for f in formats for p in ("fp32", "bf16")}
        spec = models["fp32"].spec
        held_out = range(n_train, world.n_requests)
        labels: list[np.ndarray] = []
        scores: dict[str, list[np.ndarray]] = {p: [] for p in models}
        overlaps: list[float] = []
        max_abs = 0.0
        pool = candidate_pool(catalogue, TIMING_CANDIDATES)
        for request in request_stream(world, spec, settings.max_history, request_rows=held_out):
            served = {p: serve(m, request, pool) for p, m in models.items()}
            assert request.labels is not None, "held-out requests of a world carry labels"
            labels.append(request.labels)
            for p, (value, _) in served.items():
                scores[p].append(value)
            overlaps.append(top_overlap(served["fp32"][1], served["bf16"][1]))
            difference = np.abs(served["fp32"][0] - served["bf16"][0]).max()
            max_abs = max(max_abs, float(difference))
        all_labels = np.concatenate(labels)
        aucs = {p: objective_aucs(all_labels, np.concatenate(v)) for p, v in scores.items()}
        speed = timings(timed)
    drops = {o: aucs["fp32"][o] - aucs["bf16"][o] for o in OBJECTIVES}
    accepted = max(abs(d) for d in drops.values()) <= MAX_AUC_DROP and (
        float(np.mean(overlaps)) >= MIN_TOP_OVERLAP
    )
    report = {
        "command": "python -m model.precision " + " ".join(argv if argv else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "world": str(args.world),
        "train_requests": n_train,
        "held_out_requests": len(held_out),
        "held_out_candidates": int(all_labels.shape[0]),
        "auc": aucs,
        "auc_drop": drops,
        "top50_overlap_mean": float(np.mean(overlaps)),
        "top50_overlap_min": float(np.min(overlaps)),
        "max_abs_probability_difference": max_abs,
        "timing_ms": speed,
        "threads": args.threads,
        "served_format": served_format,
        "accepted": accepted,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(to_markdown(report))
    print(Path(f"{args.out}.md").read_text())
    return 0


def to_markdown(report: dict[str, Any]) -> str:
    aucs, drops, speed = report["auc"], report["auc_drop"], report["timing_ms"]
    served = report["served_format"]
    lines = [
        "# bf16 against fp32 serving",
        "",
        f"Generated by `{report['command']}` on {report['date']}. IFA trained on the first "
        f"{report['train_requests']:,} requests of `{report['world']}` and exported; the "
        f"{report['held_out_requests']:,} held-out requests "
        f"({report['held_out_candidates']:,} candidates) served through the exported programs "
        f"({served}, the format the service's `auto` picks on this machine), once with the fp32 "
        "scorer and once with the bf16 one. bf16 = the objective towers' weights and "
        "activations in bfloat16 (`model.serving.bf16_scorer`), the attention read, degree, "
        "RAM, sigmoid and fusion in float32; the encoder, and so the cached state, is float32 "
        "in both.",
        "",
        f"Acceptance: every objective's AUC within {MAX_AUC_DROP} of fp32 and a mean top-{TOP} "
        f"overlap of at least {MIN_TOP_OVERLAP}. **Verdict: "
        f"{'accepted' if report['accepted'] else 'rejected'}.**",
        "",
        "| objective | AUC fp32 | AUC bf16 | fp32 − bf16 |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {o} | {aucs['fp32'][o]:.5f} | {aucs['bf16'][o]:.5f} | {drops[o]:+.5f} |"
        for o in OBJECTIVES
    ]
    lines += [
        "",
        f"Top-{TOP} overlap by serving score, each held-out user and state scored against the "
        f"same {TIMING_CANDIDATES:,} catalogue items: mean {report['top50_overlap_mean']:.4f}, "
        "worst "
        f"request {report['top50_overlap_min']:.4f}; largest difference of any probability "
        f"{report['max_abs_probability_difference']:.4f}.",
        "",
        f"Scorer speed at M = {TIMING_CANDIDATES:,} ({report['threads']} torch thread, best of "
        "5 medians, measured alternately in one run):",
        "",
        "| format | fp32 ms | bf16 ms | bf16 / fp32 |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {f} | {t['fp32']:.2f} | {t['bf16']:.2f} | {t['bf16'] / t['fp32']:.2f} |"
        for f, t in sorted(speed.items())
    ]
    ratio = speed[served]["bf16"] / speed[served]["fp32"]
    faster = ratio < 1 and report["accepted"]
    lines += [
        "",
        f"The served format's bf16 scorer takes {ratio:.2f}× the fp32 scorer's time on this CPU. "
        + (
            "The service's default precision `auto` therefore scores in bf16 where the CPU has "
            "bfloat16 arithmetic and the artefact a bf16 scorer, and in fp32 elsewhere."
            if faster
            else "bf16 does not pay here: run the service with `--precision fp32`."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
