"""Reading the study's runs: fields of their summaries, means, medians and their text forms,
shared by the results page's tables and its target verdicts."""

from __future__ import annotations

import math
import statistics

from .robustness import round_trip_floor


def field(runs: list[dict], key: str) -> list:
    """``summary[key]`` of every run (None for a run that failed before writing a summary)."""
    return [(run.get("summary") or {}).get(key) for run in runs]


def equal_time_steps(steps: int, timing: dict, key: str) -> float:
    """The steps of the model ``key`` that take as long as ``steps`` of the standard model,
    from side-by-side ms/step (``timing``: "transformer" and ``key``); not rounded."""
    return steps * timing["transformer"] / timing[key]


def training_seconds(results) -> tuple[int, float]:
    """(number of distinct runs, the sum of their own training wall times in seconds) over
    every run summary in ``results`` — what the whole study cost, however many invocations
    (``--resume``) it took; a run reported in several tables (the tuning seed's) counts once."""
    seen: dict[str, float] = {}

    def walk(node):
        if isinstance(node, dict):
            summary = node.get("summary")
            if isinstance(summary, dict) and "wall_time" in summary and "config" in summary:
                seen[repr(sorted(summary["config"].items()))] = summary["wall_time"] or 0.0
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(results)
    return len(seen), sum(seen.values())


def finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_std(values, digits=3) -> str:
    values = finite(values)
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def median_steps(runs: list[dict]) -> float:
    """Median steps to target over seeds; a seed that never reached it counts as ∞."""
    steps = field(runs, "steps_to_target")
    return statistics.median([math.inf if s is None else s for s in steps]) if steps else math.inf


def mean_ms(runs: list[dict]) -> float:
    """Mean milliseconds per training step over the finished runs (NaN without any)."""
    ms = finite(field(runs, "ms_per_step"))
    return statistics.mean(ms) if ms else math.nan


def mean_loss(runs: list[dict]) -> float:
    losses = finite(field(runs, "final_val_loss"))
    return statistics.mean(losses) if losses else math.nan


def steps_text(value: float, cap: int) -> str:
    return f"{value:g}" if math.isfinite(value) else f">{cap}"


def spread_text(value: float) -> str:
    if math.isnan(value):
        return "—"
    return "∞ (a start failed)" if math.isinf(value) else f"{value:.1e}"


def step_ms(entry: dict, optim: str) -> float:
    """An optimiser's ms per training step on a task: the side-by-side timing
    (``study.timing``) where the study measured one, else the mean of its runs' logs."""
    timed = (entry.get("timing") or {}).get(optim)
    return timed if timed is not None else mean_ms(entry["runs"].get(optim, []))


def gauge_floor(entry: dict, optim: str) -> float:
    """``robustness.round_trip_floor`` of an optimiser on a task: its round-trip start against
    its untransformed run on the tuning seed at the best setting (NaN where either is missing)."""
    trip = (entry.get("gauge_round_trip") or {}).get(optim)
    seed = entry["plan"]["tune_seed"]
    runs = entry.get("runs", {}).get(optim, [])
    reference = [r for r in runs if (r.get("summary") or {}).get("config", {}).get("seed") == seed]
    return round_trip_floor(reference[0], trip[0]) if trip and reference else math.nan
