"""Plotting helpers shared by the CLI's figures (``quotopt.cli.plots``) and the study's
(``quotopt.study.figures``): the library returns data, these draw it.

matplotlib is imported on first use, and figures are ``matplotlib.figure.Figure`` objects
saved directly (no ``pyplot``): no GUI backend is selected and no global figure state is
touched, so the helpers work on a headless machine and inside a notebook alike.

A *run* here is ``{"summary": summary, "records": [record, ...]}`` as ``quotopt.training``
writes them (``summary["config"]["optim"]`` names its optimiser).
"""

from __future__ import annotations

import numpy as np


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize=(6, 4), squeeze: bool = True):
    """(figure, axes) of a new figure with an ``nrows`` × ``ncols`` grid of axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig, path, dpi: int = 120) -> None:
    """Lay out ``fig`` and write it to ``path`` (the format from the suffix, e.g. PNG)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def runs_by_optim(runs: list[dict]) -> dict[str, list[dict]]:
    """``runs`` grouped by optimiser name, in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        out.setdefault(run["summary"]["config"]["optim"], []).append(run)
    return out


def curves(ax, runs: list[dict], key: str, log: bool = False) -> None:
    """Per optimiser: each seed's curve of ``record[key]`` against the step faint, the mean
    over seeds (at the steps they share) bold. Records where ``key`` is None (a diverged run)
    are left out."""
    for index, (optim, group) in enumerate(runs_by_optim(runs).items()):
        color = f"C{index}"
        series = []
        for run in group:
            pts = [(r["step"], r[key]) for r in run["records"] if r.get(key) is not None]
            if pts:
                steps, values = np.array(pts, dtype=float).T
                ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
                series.append(dict(zip(steps, values)))
        common = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if common:
            mean = [np.mean([s[t] for s in series]) for t in common]
            ax.plot(common, mean, color=color, lw=2, label=f"{optim} (mean of {len(series)})")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


__all__ = ["curves", "new_figure", "runs_by_optim", "save_figure"]
