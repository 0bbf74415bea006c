"""Plotting helpers shared by the CLI's figures (``quotopt.lab.cli.plots``) and the study's
(``quotopt.lab.study.figures``): the library returns data, these draw it.

matplotlib is imported on first use, and figures are ``matplotlib.figure.Figure`` objects
saved directly (no ``pyplot``): no GUI backend is selected and no global figure state is
touched, so the helpers work on a headless machine and inside a notebook alike.

A *run* here is ``{"summary": summary, "records": [record, ...]}`` as ``quotopt.lab.training``
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


def optim_of(run: dict) -> str:
    """The optimiser name of a run: the default grouping of ``curves``."""
    return run["summary"]["config"]["optim"]


def start_of(run: dict) -> str:
    """The start of a run: "default" (the initialisation as built), or "κ = K" for a start
    transformed into a gauge of condition number K (``RunConfig.gauge_condition``)."""
    kappa = run["summary"]["config"].get("gauge_condition")
    return "default" if kappa is None else f"κ = {kappa:g}"


def runs_by(runs: list[dict], group=optim_of) -> dict:
    """``runs`` grouped by ``group(run)``, in order of first appearance."""
    out: dict = {}
    for run in runs:
        out.setdefault(group(run), []).append(run)
    return out


def runs_by_optim(runs: list[dict]) -> dict[str, list[dict]]:
    """``runs`` grouped by optimiser name, in order of first appearance."""
    return runs_by(runs, optim_of)


def curves(ax, runs: list[dict], key: str, log: bool = False, *, group=optim_of, style=None):
    """Per group (``group(run)``, by default the optimiser): each run's curve of
    ``record[key]`` against the step faint, the mean over the group's runs (at the steps they
    share) bold and labelled. ``style(label, index)`` gives the group's line keywords (default:
    colour ``C{index}``). Records where ``key`` is None (a diverged run) are left out."""
    for index, (label, members) in enumerate(runs_by(runs, group).items()):
        kw = {"color": f"C{index}"} if style is None else style(label, index)
        series = []
        for run in members:
            pts = [(r["step"], r[key]) for r in run["records"] if r.get(key) is not None]
            if pts:
                steps, values = np.array(pts, dtype=float).T
                if len(members) > 1:
                    ax.plot(steps, values, **{**kw, "alpha": 0.25, "lw": 0.8})
                series.append(dict(zip(steps, values)))
        common = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if common:
            mean = [np.mean([s[t] for s in series]) for t in common]
            n = f" (mean of {len(series)})" if len(series) > 1 else ""
            ax.plot(common, mean, **{"lw": 2, **kw}, label=f"{label}{n}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


__all__ = [
    "curves",
    "new_figure",
    "optim_of",
    "runs_by",
    "runs_by_optim",
    "save_figure",
    "start_of",
]
