"""How long a fold on the event loop waits while the model thread encodes a whole history, with
one AOTInductor runner per program against one per calling thread.

    python -m service.runner_bench --model-dir artifacts [--runners 1,2] [--history 1000]
        [--fold 8] [--seconds 5]

An AOTInductor package runs one call at a time per runner: with a single runner the loop's fold
(a few events) queues behind the model thread's encode (a whole window). For each runner count
the encoder is loaded, a background thread encodes ``--history`` events back to back (a stream
of cache misses), and the main thread times ``--fold``-event encodes (the folds of /rank) for
``--seconds``; an idle run (no background encode) is the floor. Prints the fold latency
percentiles and the resident memory the load added (a first load in the process includes
torch's own; run one runner count per process to compare them).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.artifact import ServingModel, load_artifact


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def event_inputs(model: ServingModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(events (n, F_event), times (n,)) of ``n`` random events over the catalogue's items."""
    rng = np.random.default_rng(seed)
    item_rows, _ = model.catalogue.rows(rng.integers(0, 1000, n))
    times = np.sort(rng.uniform(1.7e9, 1.7e9 + 86400.0, n))
    actions = rng.integers(0, len(model.manifest.actions), n)
    rows = model.spec.event_rows(item_rows, actions, times)
    return torch.from_numpy(rows), torch.from_numpy(times)


def fold_latencies(
    model: ServingModel, history: int, fold: int, seconds: float, busy: bool
) -> np.ndarray:
    """Seconds per fold on this thread, while another thread encodes (``busy``) or not."""
    long_events, long_times = event_inputs(model, history, 0)
    events, times = event_inputs(model, fold, 1)
    reference = float(times[-1])
    done = threading.Event()

    def encode_forever() -> None:
        torch.set_num_threads(1)
        while not done.is_set():
            model.encode(long_events, long_times, float(long_times[-1]))

    background = threading.Thread(target=encode_forever, daemon=True)
    if busy:
        background.start()
        time.sleep(0.2)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        model.encode(events, times, reference)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.002)  # the loop does other work between folds
    done.set()
    if busy:
        background.join()
    return np.array(latencies)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--history", type=int, default=1000, help="events per background encode")
    parser.add_argument("--fold", type=int, default=8, help="events per timed fold")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed per configuration")
    parser.add_argument("--runners", default="1,2", help="comma list of runner counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| runners | background | folds | p50 ms | p99 ms | max ms | RSS added MiB |")
    print("|---|---|---|---|---|---|---|")
    for runners in [int(count) for count in args.runners.split(",")]:
        before = resident_bytes()
        model = load_artifact(args.model_dir, "aoti", runners=runners)
        model.encode(*event_inputs(model, 4, 2), 1.7e9 + 86400.0)  # first call
        added = (resident_bytes() - before) / 2**20
        for busy in (False, True):
            seconds = fold_latencies(model, args.history, args.fold, args.seconds, busy)
            p50, p99 = np.percentile(seconds, [50, 99]) * 1000
            print(
                f"| {runners} | {'encode' if busy else 'idle'} | {len(seconds)} | {p50:.2f} "
                f"| {p99:.2f} | {seconds.max() * 1000:.2f} | {added:.0f} |"
            )
        del model


if __name__ == "__main__":
    main()
