"""AUC by request history-length bucket for IFA, IFA-FSM, TWIN and SIM-hard (``history_length``).

Reuses the table runs: every run records its per-bucket AUCs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from model.experiments.common import (
    HISTORY_NETS,
    LABELS,
    SYNTHETIC,
    Options,
    Report,
    fmt,
    mean_std,
    pp,
    train_nets,
)
from model.features import OBJECTIVES


def history_length(options: Options) -> Report:
    trained = train_nets(options, options.synthetic_world(), SYNTHETIC, HISTORY_NETS)
    grid, out = trained.grid, options.out
    first = next(iter(grid["ifa"].values()))
    buckets = [_bucket_label(b["lo"], b["hi"]) for b in first["auc_by_history"]]
    counts = [int(b["count"]) for b in first["auc_by_history"]]
    per_bucket: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for net in HISTORY_NETS:
        per_bucket[net] = {
            o: [
                mean_std([r["auc_by_history"][i][o] for r in grid[net].values()])
                for i in range(len(buckets))
            ]
            for o in OBJECTIVES
        }
    oracle = {o: [b[o] for b in first["oracle_by_history"]] for o in OBJECTIVES}
    gains = _bucket_gaps(grid, "ifa", "twin", len(buckets))
    fsm_gains = _bucket_gaps(grid, "ifa", "ifa_no_fsm", len(buckets))
    sections = [
        trained.setup()
        + " Buckets are the quintiles of request history length in the world (the length before "
        "max_history truncation); each bucket's AUC is over the candidates of its requests.",
    ]
    for o in ("impression", "click", "long_view", "like"):
        lines = [
            f"**{o}**\n",
            "| history length | candidates | "
            + " | ".join(LABELS[n] for n in HISTORY_NETS)
            + " | oracle | IFA − TWIN | IFA − IFA-FSM |",
            "|---|---|" + "---|" * (len(HISTORY_NETS) + 3),
        ]
        for i, label in enumerate(buckets):
            lines.append(
                f"| {label} | {counts[i]:,} | "
                + " | ".join(fmt(per_bucket[n][o][i]) for n in HISTORY_NETS)
                + f" | {oracle[o][i]:.4f} | {gains[o][i][0]:+.4f} ± {gains[o][i][1]:.4f} "
                f"| {fsm_gains[o][i][0]:+.4f} ± {fsm_gains[o][i][1]:.4f} |"
            )
        sections.append("\n".join(lines))
    sections.append(interpret_history(buckets, per_bucket, gains, fsm_gains, oracle))
    _plot_history(buckets, per_bucket, oracle, out / f"history_length{options.suffix}.png")
    return Report(
        f"history_length{options.suffix}",
        f"AUC against history length: IFA vs TWIN-style sampling ({options.preset} world)",
        sections,
        {
            **trained.header("history_length"),
            "buckets": buckets,
            "edges": first["history_edges"],
            "candidates": counts,
            "auc": {
                n: {o: [{"mean": m, "std": s} for m, s in v] for o, v in per_bucket[n].items()}
                for n in HISTORY_NETS
            },
            "oracle": oracle,
            "ifa_minus_twin": {o: [{"mean": m, "std": s} for m, s in v] for o, v in gains.items()},
            "ifa_minus_ifa_no_fsm": {
                o: [{"mean": m, "std": s} for m, s in v] for o, v in fsm_gains.items()
            },
        },
    )


def _bucket_gaps(
    grid: dict[str, dict[int, dict[str, Any]]], better: str, worse: str, n_buckets: int
) -> dict[str, list[tuple[float, float]]]:
    """Per bucket and objective, mean ± std over seeds of the paired AUC difference."""
    return {
        o: [
            mean_std(
                [
                    grid[better][s]["auc_by_history"][i][o] - grid[worse][s]["auc_by_history"][i][o]
                    for s in grid[better]
                ]
            )
            for i in range(n_buckets)
        ]
        for o in OBJECTIVES
    }


def _bucket_label(lo: float, hi: float) -> str:
    return f"[{lo:.0f}, {'∞' if math.isinf(hi) else f'{hi:.0f}'})"


def _plot_history(
    buckets: list[str],
    per_bucket: dict[str, dict[str, list[tuple[float, float]]]],
    oracle: dict[str, list[float]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(4 * len(OBJECTIVES), 3.6))
    x = np.arange(len(buckets))
    for ax, o in zip(axes, OBJECTIVES, strict=True):
        for net in HISTORY_NETS:
            means = [m for m, _ in per_bucket[net][o]]
            stds = [s for _, s in per_bucket[net][o]]
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=LABELS[net])
        ax.plot(x, oracle[o], "k--", linewidth=1, label="oracle")
        ax.set_xticks(x, buckets, rotation=30, ha="right", fontsize=8)
        ax.set_title(o)
        ax.set_xlabel("request history length")
    axes[0].set_ylabel("AUC")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def interpret_history(
    buckets: list[str],
    per_bucket: dict[str, dict[str, list[tuple[float, float]]]],
    gains: dict[str, list[tuple[float, float]]],
    fsm_gains: dict[str, list[tuple[float, float]]],
    oracle: dict[str, list[float]],
) -> str:
    def listed(values: dict[str, list[tuple[float, float]]], o: str) -> str:
        return ", ".join(pp(g) for g, _ in values[o])

    fsm_click = [g for g, _ in fsm_gains["click"]]
    # "Grows" needs a steady rise, not one low first bucket: the gain must track the bucket order
    # and rise by more than half a point from the shortest to the longest histories.
    trend = float(np.corrcoef(np.arange(len(fsm_click)), fsm_click)[0, 1])
    grows = trend > 0.8 and fsm_click[-1] > fsm_click[0] + 0.005
    text = [
        "**Interpretation.**",
        f"IFA − TWIN by bucket, click: {listed(gains, 'click')}; impression: "
        f"{listed(gains, 'impression')}. TWIN lacks RAM, so this gap mixes both of IFA's parts; "
        f"IFA − IFA-FSM (both with RAM, full sequence against top-50 sampling) isolates FSM: "
        f"click {listed(fsm_gains, 'click')}; impression {listed(fsm_gains, 'impression')}.",
        (
            "FSM's contribution grows with the history, as the paper's argument predicts: a K = 50 "
            "sub-sequence holds a shrinking share of a long history, IFA's state sums all of it."
            if grows
            else "FSM's contribution does *not* grow with the history. On the shortest "
            "histories the top 50 holds (almost) the whole history, so both models see the same "
            "events and the gap there is not coverage: it is what the two reads report, TWIN's "
            "softmax a share of its events and IFA's degree a count. That part of the gap is "
            "there at every length; what a longer history adds on top of it (events beyond the "
            "top 50) does not widen the gap measurably here."
        ),
    ]
    models = {n: [m for m, _ in per_bucket[n]["click"]] for n in per_bucket}
    text.append(
        "Click AUC from the shortest to the longest bucket: "
        + ", ".join(f"{LABELS[n]} {v[0]:.4f} → {v[-1]:.4f}" for n, v in models.items())
        + f", oracle {oracle['click'][0]:.4f} → {oracle['click'][-1]:.4f}."
    )
    if all(v[-1] > v[0] + 0.005 for v in models.values()):
        text[-1] += (
            " Every model gains from a longer history (more evidence about the user's topics) "
            "while the ceiling stays about flat, so part of each model's gap to the oracle on "
            "short histories is simply missing evidence."
        )
    return "\n\n".join(text)
