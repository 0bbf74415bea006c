"""The study's targets, each with the measured figures and a verdict computed from the runs.

* modadd: a quotient optimiser reaches 99 % validation accuracy in ≤ 0.5× the steps of the
  baseline (tuned AdamW, then tuned Muon; medians over seeds) at ≤ 1.5× its time per step;
* chars: a quotient optimiser ends ≥ 0.03 nats below the baseline (means over seeds) at ≤ 1.5×
  its time per step;
* gauge: the relative spread of the final validation loss over the gauge-transformed starts
  is ≤ 1e-3 for every quotient optimiser (the baselines' spreads are reported beside it);
* relational: the relational model within 0.05 nats of the standard one at equal parameters.
"""

from __future__ import annotations

import math
import statistics

from .protocol import LABELS, QUOTIENT
from .relational_report import equal_time_losses
from .robustness import gauge_spread
from .summaries import (
    finite,
    gauge_floor,
    mean_loss,
    median_steps,
    spread_text,
    step_ms,
    steps_text,
)

BASELINES = ("adamw", "muon")
GAUGE_TARGET = 1e-3


def _row(target: str, measured: str, met: bool) -> str:
    return f"| {target} | {measured} | {'met' if met else 'missed'} |"


def _label(optim: str) -> str:
    return LABELS.get(optim, optim)


def _modadd(entry: dict) -> list[str]:
    runs, cap, lines = entry["runs"], entry["plan"]["steps"], []
    for base in (b for b in BASELINES if b in runs):
        b_steps, b_ms = median_steps(runs[base]), step_ms(entry, base)
        for optim in (q for q in QUOTIENT if q in runs):
            steps, wall = median_steps(runs[optim]), step_ms(entry, optim) / b_ms
            ratio = steps / b_steps if math.isfinite(steps) and math.isfinite(b_steps) else math.nan
            met = ratio <= 0.5 and wall <= 1.5
            shown = f" (×{ratio:.2f})" if math.isfinite(ratio) else ""
            lines.append(
                _row(
                    f"modadd: {_label(optim)} ≤ 0.5× {_label(base)}'s steps to 99 % at ≤ 1.5× "
                    "time/step",
                    f"{steps_text(steps, cap)} vs {steps_text(b_steps, cap)} steps{shown}; "
                    f"×{wall:.2f} time/step",
                    met,
                )
            )
    return lines


def _chars(entry: dict) -> list[str]:
    runs, lines = entry["runs"], []
    for base in (b for b in BASELINES if b in runs):
        b_loss, b_ms = mean_loss(runs[base]), step_ms(entry, base)
        for optim in (q for q in QUOTIENT if q in runs):
            gain, wall = b_loss - mean_loss(runs[optim]), step_ms(entry, optim) / b_ms
            met = gain >= 0.03 and wall <= 1.5
            lines.append(
                _row(
                    f"chars: {_label(optim)} ≥ 0.03 nats below {_label(base)} at ≤ 1.5× time/step",
                    f"{-gain:+.3f} nats; ×{wall:.2f} time/step",
                    met,
                )
            )
    return lines


def _gauge(task: str, entry: dict) -> list[str]:
    gauge, lines = entry.get("gauge", {}), []
    spreads = {optim: gauge_spread(runs)["loss"] for optim, runs in gauge.items()}
    baselines = "; ".join(
        f"{_label(b)} {spread_text(spreads[b])}" for b in BASELINES if b in spreads
    )
    for optim in (q for q in QUOTIENT if q in spreads):
        met = spreads[optim] <= GAUGE_TARGET
        kappas = ", ".join(f"{r['gauge_condition']:g}" for r in gauge[optim])
        floor = spread_text(gauge_floor(entry, optim))
        lines.append(
            _row(
                f"{task}: {_label(optim)}'s final loss spread over gauges κ ∈ {{{kappas}}} ≤ 1e-3",
                f"{spread_text(spreads[optim])}, round-off floor {floor} "
                f"(baselines: {baselines or '—'})",
                met,
            )
        )
    return lines


def _relational(results: dict) -> list[str]:
    rel = results["relational"]
    runs, lines = rel["runs"], []
    standard = mean_loss(runs.get("transformer", []))
    gap = mean_loss(runs.get("relational", [])) - standard
    if not math.isnan(gap):
        lines.append(
            _row(
                "relational within 0.05 nats of the standard model at equal parameters",
                f"{gap:+.3f} nats",
                gap <= 0.05,
            )
        )
    if "best" in rel:
        at_time = finite(equal_time_losses(rel, rel["seeds"], rel["best"]["variant"]))
        read = statistics.mean(at_time) - standard if at_time else math.nan
        measured = f"{read:+.3f} nats read part-way through the equal-FLOPs runs"
        gap = read
        if "equal_time" in rel:  # trained for that time: the verdict's figure
            trained = mean_loss(rel["equal_time"]["runs"])
            gap = trained - standard
            measured = f"{gap:+.3f} nats trained for that time; {measured}"
        lines.append(
            _row(
                f"the best relational configuration (`{rel['best']['variant']}`) within 0.05 nats "
                "of the standard model at equal training time",
                measured,
                gap <= 0.05,
            )
        )
    return lines


def targets(results: dict) -> list[str]:
    """The "Targets" section of the results page."""
    tasks = results["tasks"]
    lines = ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    if "modadd" in tasks:
        lines += _modadd(tasks["modadd"])
    if "chars" in tasks:
        lines += _chars(tasks["chars"])
    for task, entry in tasks.items():
        lines += _gauge(task, entry)
    return lines + _relational(results) + [""]
