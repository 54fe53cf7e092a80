"""The paper's experiments (IFA §5) and the fair study: ``python -m model.experiment NAME``.

* ``table2`` — every model × objective AUC (mean ± std over seeds) on the medium synthetic
  world, the oracle as the last row, and each model's training throughput.
* ``table3`` — the ablations: IFA, IFA without FSM (TWIN's two-step attention + RAM), IFA
  without FSM and RAM (which is TWIN), and IFA without its degree feature (the paper's IFA).
* ``history_length`` — AUC by request history-length bucket for IFA, IFA-FSM, TWIN and SIM-hard.
* ``movielens`` — the table2 models and protocol on MovieLens 100K (no ground truth, no oracle).
* ``fair`` — published baselines (DIN's activation unit, TWIN with K 50/100/200) and their
  "+mass" variants against the paper's IFA and IFA+degree on world presets the method was not
  tuned on: AUC, GAUC, log loss and ECE per objective with bootstrap intervals over requests.
  ``--world DIR`` runs it on a world of one's own (``python -m model.prepare``), ``--nets`` on
  a subset of the networks.
* ``fair_movielens`` — the same models and metrics on MovieLens 100K, with IFA's ablations.
* ``ifa_variants`` — IFA+degree, +decay, +channel and both on the tuning world: the demo's network.
* ``curve`` — the fair study's networks on one study world at 17× its requests, one streaming pass:
  click GAUC after 1×, 2×, 4×, 8× and 16× the study's requests were seen (results/curve.png).
* ``cross`` — worlds where topics spread across 64 categories (Dirichlet α 0.3 to 10), no
  category term in the truth, with the oracle restricted to same-category history beside the full
  one.

Each writes ``results/<name>.md`` and ``.json`` (most also a ``.png``). The studies live in
``model/experiments/`` (one module each); this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from model.experiments.common import RESULTS, RUNS, SEEDS, WORLDS, Options, Report
from model.experiments.cross import CROSS_SEEDS, cross
from model.experiments.curve import STUDY_SEEDS, curve
from model.experiments.fair import fair, fair_movielens
from model.experiments.history import history_length
from model.experiments.movielens import movielens
from model.experiments.tables import table2, table3
from model.experiments.variants import ifa_variants

# -- command line -------------------------------------------------------------------------


EXPERIMENTS: dict[str, Callable[[Options], Report]] = {
    "table2": table2,
    "table3": table3,
    "history_length": history_length,
    "movielens": movielens,
    "fair": fair,
    "fair_movielens": fair_movielens,
    "ifa_variants": ifa_variants,
    "curve": curve,
    "cross": cross,
}
DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {"curve": STUDY_SEEDS, "cross": CROSS_SEEDS}
"""Seeds of a study whose runs are long (the others: SEEDS)."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.experiment", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="default: 0 1 for curve, 0 for cross, else 0 1 2"
    )
    parser.add_argument("--workers", type=int, default=2, help="training processes at once")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--preset", default="medium", help="synthetic world preset")
    parser.add_argument("--runs", type=Path, default=RUNS, help="run cache directory")
    parser.add_argument(
        "--burn-in",
        type=int,
        default=0,
        help="extra passes over the first half before evaluating the second half",
    )
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="report on the runs already cached; train nothing (the report lists what ran)",
    )
    parser.add_argument(
        "--presets",
        nargs="+",
        default=[],
        help="world presets of the fair study (default: all); the base preset of curve, cross",
    )
    parser.add_argument(
        "--nets",
        nargs="+",
        default=[],
        help="networks of the study, space- or comma-separated (default: the study's own list)",
    )
    parser.add_argument(
        "--unit-users",
        type=int,
        help="curve, cross: users per unit of requests (default: the base preset's users)",
    )
    parser.add_argument(
        "--cross-units",
        type=int,
        help="cross: world size in units of the study's requests, the last one scored (default 4)",
    )
    parser.add_argument(
        "--world",
        type=Path,
        default=None,
        help="fair: a world directory of your own (python -m model.prepare) instead of presets",
    )
    args = parser.parse_args(argv)
    seeds = tuple(args.seeds) if args.seeds else DEFAULT_SEEDS.get(args.name, SEEDS)
    options = Options(
        seeds,
        args.workers,
        args.out,
        args.preset,
        WORLDS,
        args.runs,
        args.burn_in,
        args.cached_only,
        tuple(args.presets),
        tuple(net for arg in args.nets for net in arg.split(",") if net),
        args.unit_users,
        args.cross_units,
        args.world,
    )
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report = EXPERIMENTS[args.name](options)
    elapsed = time.perf_counter() - started
    report.data["wall_seconds"] = elapsed
    report.sections.append(
        f"*Generated by `python -m model.experiment {' '.join(argv or sys.argv[1:])}` "
        f"in {elapsed:.0f} s (cached runs are reused, not retrained). The "
        f"{report.data['training_seconds']['runs']} runs behind it took "
        f"{report.data['training_seconds']['seconds']:.0f} s of training wall time in all, "
        f"{options.workers} at a time.*"
    )
    report.write(args.out)
    print("\n\n".join(report.sections[1:3]))
    written = [
        f".{e}" for e in ("md", "json", "png") if (args.out / f"{report.name}.{e}").is_file()
    ]
    print(f"wrote {args.out / report.name}{', '.join(written)} in {elapsed:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
