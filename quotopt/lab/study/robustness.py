"""Robustness of an optimiser, computed from the study's runs.

* ``basin_share``: the share of the settings of the starting grid (the same grid for every
  optimiser of a family, so shares compare) whose tuning run is within ``LOSS_MARGIN`` nats of
  the best final validation loss on that grid, or — on a task ranked by steps to its target —
  reached the target within ``STEPS_FACTOR`` × the best run's steps. A wide basin means the
  optimiser needs little tuning.
* ``seeds_reaching``: how many of the seeds at the best setting reached the task's target.
* ``gauge_spread``: the relative spread (max − min) / |median| of an outcome over the
  gauge-transformed starts of one optimiser (every start computes the same function; only the
  gauge of its parameters differs). An optimiser that is gauge-equivariant in exact arithmetic
  has a spread at the level of floating-point noise amplified by training; a run that failed or
  diverged makes the spread infinite.
* ``round_trip_floor``: the same for a start transformed by g and back by g⁻¹ at the largest κ
  against the untransformed run: the part of the spread that round-off of the transformation
  alone causes, which no optimiser can remove (a float32 start transformed by κ = 1000
  represents its function only to about eps·κ ≈ 6e-5, and training amplifies that).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

LOSS_MARGIN = 0.05
STEPS_FACTOR = 1.5


def _summary(run: dict) -> dict | None:
    s = run.get("summary")
    return None if s is None or s.get("diverged") else s


def _loss(run: dict) -> float:
    s = _summary(run)
    value = None if s is None else s.get("final_val_loss")
    return math.inf if value is None or not math.isfinite(value) else value


def _steps(run: dict) -> float:
    s = _summary(run)
    value = None if s is None else s.get("steps_to_target")
    return math.inf if value is None else float(value)


def basin_share(tuning: Sequence[dict], initial: Sequence[tuple[float, float]], criterion: str):
    """(share in [0, 1], number of settings) over the ``initial`` grid's settings."""
    runs = [t for t in tuning if (t["lr"], t["weight_decay"]) in set(initial)]
    if not runs:
        return math.nan, 0
    if criterion == "steps":
        values = [_steps(r) for r in runs]
        best = min(values)
        near = [math.isfinite(v) and v <= STEPS_FACTOR * best for v in values]
    else:
        values = [_loss(r) for r in runs]
        best = min(values)
        near = [math.isfinite(v) and v <= best + LOSS_MARGIN for v in values]
    return sum(near) / len(runs), len(runs)


def seeds_reaching(runs: Sequence[dict]) -> tuple[int, int]:
    """(seeds that reached the target, seeds)."""
    return sum(math.isfinite(_steps(r)) for r in runs), len(runs)


def relative_spread(values: Sequence[float]) -> float:
    """(max − min) / |median|; infinite when a value is (a run failed), NaN without values."""
    if not values:
        return math.nan
    if any(not math.isfinite(v) for v in values):
        return math.inf
    middle = abs(statistics.median(values))
    return (max(values) - min(values)) / middle if middle > 0 else math.inf


def round_trip_floor(reference: dict, round_trip: dict) -> float:
    """Relative difference of the final validation loss between a run and the same start
    transformed by g and back by g⁻¹ (same gauge, the transformations' round-off only): what
    floating-point round-off alone leaves of the gauge spread."""
    return relative_spread([_loss(reference), _loss(round_trip)])


def gauge_spread(runs: Sequence[dict]) -> dict[str, float]:
    """Relative spread of the final validation loss and of the steps to target (where any
    start reached it) over the gauge-transformed starts ``runs``."""
    out = {"loss": relative_spread([_loss(r) for r in runs])}
    steps = [_steps(r) for r in runs]
    if any(math.isfinite(s) for s in steps):
        out["steps"] = relative_spread(steps)
    return out
