"""``ifa_variants``: which IFA variant the demo serves, chosen on the tuning world only.

IFA+degree, with its learned time decay, with the exact-match channel on the category, and with
both, trained with the Table 2 protocol on the tuning world (``medium-0``, the world every
design choice of IFA was made on; results/design_sweeps.md) and scored like the fair study
(GAUC per objective, paired bootstrap over requests). The variant with the highest mean click
GAUC is the demo's network (``model.demo.DEMO_NET``); the fair study's worlds play no part in
the choice, so their verdicts stay out-of-sample for it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from model.bootstrap import N_REPLICATES
from model.experiments.common import SYNTHETIC, Options, Report, training_seconds
from model.experiments.fair import (
    IFA_VARIANTS,
    LABELS,
    SELECTION,
    best_ifa,
    comparison_table,
    comparisons,
    metric_table,
    score_world,
)

VARIANT_NETS: tuple[str, ...] = ("ifa", *IFA_VARIANTS)
TUNING = replace(SYNTHETIC, save_predictions=True)


def ifa_variants(options: Options) -> Report:
    world = options.synthetic_world()
    scored = score_world(options, world, TUNING, VARIANT_NETS, N_REPLICATES)
    if scored is None:
        raise RuntimeError(f"no runs on {world}: train them (leave out --cached-only)")
    winner = best_ifa(scored)
    assert winner is not None
    tests = comparisons(scored, VARIANT_NETS, "ifa")
    objective, metric = SELECTION
    choice = (
        f"**Choice.** The highest mean {objective} {metric.upper()} on `{world.name}`: "
        f"**{LABELS[winner]}** (`{winner}`), which the demo serves. Each variant against "
        "IFA+degree (paired bootstrap over requests, 95%):"
    )
    setup = (
        f"**Setup.** World `{world}` (the tuning world), the Table 2 protocol: one pass, batch "
        f"{TUNING.batch_size}, lr {TUNING.lr:g}, max_history {TUNING.max_history}, shared "
        f"settings {dict(TUNING.net_overrides)}, the first {TUNING.warmup:.0%} of batches not "
        f"evaluated; seeds {', '.join(map(str, options.seeds))}; {N_REPLICATES} bootstrap "
        f"replicates over {scored.n_requests:,} requests."
    )
    sections = [
        setup,
        choice,
        comparison_table(tests, "ifa") if tests else "Only IFA+degree ran.",
        *(metric_table(scored, o) for o in ("click", "impression")),
    ]
    data: dict[str, Any] = {
        "world": str(world),
        "seeds": scored.seeds,
        "selection": list(SELECTION),
        "winner": winner,
        "against_ifa": tests,
        "metrics": scored.point,
        "training_seconds": training_seconds(scored.runs),
    }
    return Report(
        "ifa_variants", "IFA variants on the tuning world: the demo's network", sections, data
    )
