"""The study's PNG figures, drawn with ``quotopt.lab.plotting``: curves at each optimiser's best
setting, gauge dynamics, relational vs standard by training time, flat-direction counts by
tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plotting import curves, new_figure, save_figure

CURVE_KEY = {"steps": None, "loss": "val_loss", "accuracy": "val_accuracy"}


def _labelled(runs_by_optim: dict[str, list[dict]]) -> list[dict]:
    """Finished runs, each named by its optimiser (the legend entries)."""
    out = []
    for optim, runs in runs_by_optim.items():
        for run in runs:
            if run.get("summary"):
                summary = dict(run["summary"], config=dict(run["summary"]["config"], optim=optim))
                out.append(dict(run, summary=summary))
    return out


def task_curves(task: str, entry: dict, path: Path) -> None:
    """Validation metric and loss against steps, each optimiser at its best setting."""
    metric = entry["metric"]
    keys = [f"val_{metric}"] if metric != "loss" else []
    keys.append("val_loss")
    fig, axes = new_figure(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    runs = _labelled(entry["runs"])
    for ax, key in zip(axes[0], keys):
        curves(ax, runs, key, log=key == "val_loss")
        ax.set_title(f"{task}: {key.replace('_', ' ')} (faint: seeds; bold: mean)")
    save_figure(fig, path, dpi=110)


def dynamics(task: str, entry: dict, path: Path) -> None:
    """Gauge drift, per-head imbalance and balance gap over training (every seed's mean)."""
    keys = ("gauge_drift", "head_imbalance", "balance_gap")
    fig, axes = new_figure(1, 3, figsize=(17, 4))
    runs = _labelled(entry["runs"])
    for ax, key in zip(axes, keys):
        curves(ax, runs, key, log=True)
        ax.set_title(f"{task}: {key.replace('_', ' ')}")
    save_figure(fig, path, dpi=110)


def relational(runs: dict[str, list[dict]], path: Path) -> None:
    """Validation loss against training time (seconds) for both architectures."""
    fig, ax = new_figure(figsize=(7, 4))
    for index, (model, group) in enumerate(runs.items()):
        for seed_index, run in enumerate(r for r in group if r.get("summary")):
            pts = [(r["train_time"], r["val_loss"]) for r in run["records"] if r["val_loss"]]
            if not pts:  # diverged from the start: nothing to draw
                continue
            t, v = np.array(pts).T
            label = f"{model} ({run['summary']['n_params']:,} params)" if not seed_index else None
            ax.plot(t, v, color=f"C{index}", lw=1.2, label=label)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=110)


def flat_counts(reports: list[dict], path: Path) -> None:
    """Flat directions (total and horizontal) against the relative tolerance, per decay."""
    fig, ax = new_figure(figsize=(7, 4))
    for index, report in enumerate(r for r in reports if "flat_by_tolerance" in r):
        tols = sorted(report["flat_by_tolerance"], key=float)
        counts = np.array([report["flat_by_tolerance"][t] for t in tols])
        x = [float(t) for t in tols]
        wd = report["objective_weight_decay"]
        ax.plot(x, counts[:, 0], f"C{index}-", label=f"total, λ = {wd:g}")
        ax.plot(x, counts[:, 1], f"C{index}--", label=f"horizontal, λ = {wd:g}")
    ax.set_xscale("log")
    ax.set_xlabel("tolerance |eigenvalue| ≤ tol · max|eigenvalue|")
    ax.set_ylabel("near-null eigenvalues")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def gauge(task: str, entry: dict, key: str, path: Path) -> None:
    """The outcome (``summary[key]``) against the condition number κ of the gauge-transformed
    start, one line per optimiser (an unfinished or diverged start is left out)."""
    fig, ax = new_figure(figsize=(7, 4))
    for index, (optim, runs) in enumerate(entry.get("gauge", {}).items()):
        pts = [
            (r["gauge_condition"], r["summary"][key])
            for r in runs
            if r.get("summary") and not r["summary"].get("diverged") and r["summary"][key]
        ]
        if pts:
            x, y = np.array(sorted(pts), dtype=float).T
            ax.plot(x, y, f"C{index}o-", label=optim)
    ax.set_xscale("log")
    ax.set_xlabel("condition number κ of the head gauge at the start")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{task}: one initial function in gauges of growing condition number")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    save_figure(fig, path, dpi=110)


__all__ = ["dynamics", "flat_counts", "gauge", "relational", "task_curves"]
