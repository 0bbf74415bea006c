"""Learning-rate schedules of a run, as a factor of the configured rate at each step.

``constant``: 1 at every step. ``cosine``: nanoGPT's schedule — a linear warm-up over the first
``warmup(steps)`` steps (a tenth of the run, at most 100 steps), then a half cosine from 1 down to
``MIN_FACTOR`` at the last step. The factor depends on the step alone, so a resumed run sets the
same rates without any scheduler state in its checkpoint.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")
MIN_FACTOR = 0.1  # nanoGPT: min_lr = learning_rate / 10


def warmup(steps: int) -> int:
    return min(100, steps // 10)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The factor of the configured rate used by the step that follows ``step`` completed steps."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; valid names are {', '.join(SCHEDULES)}")
    w = warmup(steps)
    if step < w:
        return (step + 1) / (w + 1)
    progress = (step - w) / max(steps - 1 - w, 1)
    return MIN_FACTOR + (1 - MIN_FACTOR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_rates(optimizer, base_rates: list[float], factor: float) -> None:
    """Every param group's ``lr`` = its configured rate × ``factor``."""
    for group, rate in zip(optimizer.param_groups, base_rates):
        group["lr"] = rate * factor
