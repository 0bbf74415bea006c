"""Tuning on a grid that brackets its best setting.

A ``Grid`` is the starting set of (lr, wd) settings. After it has run, ``extend`` proposes the
settings that would move the best one off an edge: for each axis whose best value is the
smallest (largest) value the grid holds, one more value past it — the axis's own ratio (the
ratio of its two nearest values; 3 when the axis had one value and is not fixed) applied to the
best value — at the best value of the other axis. Each edge grows at most ``extensions`` times.
A weight decay of 0 is the optimiser's bound, not an edge, and an axis given a single value is
*fixed* by the plan (nothing is extended there).

``bracket`` states where the final best sits on each axis: ``interior`` (a smaller and a larger
value were tried and lost), ``bound`` (wd = 0), ``fixed`` (a one-value axis) or ``edge`` (still
on an edge once the extensions were spent: a wider grid might do better).
"""

from __future__ import annotations

from collections.abc import Sequence

from .protocol import Grid, score

Setting = tuple[float, float]
AXES = (("lr", 0), ("wd", 1))


def best_setting(settings: Sequence[Setting], summaries: Sequence, criterion: str) -> Setting:
    """The best-scoring setting; ties go to the first in ``settings`` order."""
    scores = [score(s, criterion) for s in summaries]
    return settings[min(range(len(settings)), key=lambda i: scores[i])]


def _ratio(values: list[float], at: float, upward: bool) -> float:
    """The grid's step next to ``at`` on a sorted axis (3 when it holds a single value)."""
    positive = [v for v in values if v > 0]
    if len(positive) < 2:
        return 3.0
    i = positive.index(at) if at in positive else 0
    j = i - 1 if upward else i + 1
    j = min(max(j, 0), len(positive) - 1)
    if j == i:  # at the other end: use the step on the far side
        j = i + 1 if upward else i - 1
    return max(positive[i], positive[j]) / min(positive[i], positive[j])


def _edges(grid: Grid, settings: Sequence[Setting], best: Setting) -> dict[str, str]:
    """axis -> "interior" | "bound" | "fixed" | "low" | "high" for ``best`` among ``settings``."""
    out = {}
    for name, k in AXES:
        given = (grid.lrs, grid.weight_decays)[k]
        values = sorted({s[k] for s in settings})
        if len(given) == 1:
            out[name] = "fixed"
        elif name == "wd" and best[k] == 0:
            out[name] = "bound"
        elif best[k] == values[0]:
            out[name] = "low"
        elif best[k] == values[-1]:
            out[name] = "high"
        else:
            out[name] = "interior"
    return out


def extend(
    grid: Grid,
    settings: Sequence[Setting],
    summaries: Sequence,
    criterion: str,
    extensions: int,
    used: dict[str, int],
) -> list[Setting]:
    """New settings that push the best off an edge (``used`` counts extensions per edge and
    is updated); empty when the best is bracketed or the extensions are spent."""
    best = best_setting(settings, summaries, criterion)
    new = []
    for (name, k), where in zip(AXES, _edges(grid, settings, best).values()):
        key = f"{name} {where}"
        if where not in ("low", "high") or used.get(key, 0) >= extensions:
            continue
        values = sorted({s[k] for s in settings})
        step = _ratio(values, best[k], upward=where == "high")
        value = best[k] * step if where == "high" else best[k] / step
        value = float(f"{value:.3g}")
        proposal = (value, best[1]) if k == 0 else (best[0], value)
        if proposal not in settings and proposal not in new:
            used[key] = used.get(key, 0) + 1
            new.append(proposal)
    return new


def bracket(grid: Grid, settings: Sequence[Setting], best: Setting) -> dict[str, str]:
    """axis -> "interior" | "bound" | "fixed" | "edge" for the final ``best``."""
    return {
        name: "edge" if where in ("low", "high") else where
        for name, where in _edges(grid, settings, best).items()
    }
