"""PNG figures of the CLI, drawn with ``quotopt.plotting``: the library returns data, this
draws it."""

from __future__ import annotations

import numpy as np

from ..plotting import curves, new_figure, save_figure


def loss_plot(runs: list[dict], path, title: str = "") -> None:
    """Validation loss vs step per optimiser (faint: seeds; bold: mean)."""
    fig, ax = new_figure(figsize=(6, 4))
    curves(ax, runs, "val_loss", log=True)
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def dynamics_plot(runs: list[dict], path, title: str = "") -> None:
    """Mean gauge drift and mean per-head imbalance of the attention heads vs step."""
    fig, axes = new_figure(1, 2, figsize=(10, 4))
    curves(axes[0], runs, "gauge_drift")
    axes[0].set_title("gauge drift ‖p − dress(p)‖ / ‖p‖", fontsize=9)
    curves(axes[1], runs, "head_imbalance", log=True)
    axes[1].set_title("head imbalance ‖AᵀA − BᵀB‖_F", fontsize=9)
    for ax in axes:
        ax.set_ylabel("mean over attention heads")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def spectrum_plot(result: dict, path) -> None:
    """Sorted |eigenvalues| (log scale) of the total and horizontal Hessians, with the
    flatness threshold."""
    fig, ax = new_figure(figsize=(6, 4))
    tiny = np.finfo(float).tiny
    for key, label in (("eigenvalues", "total space"), ("horizontal_eigenvalues", "horizontal")):
        values = np.sort(np.abs(np.asarray(result.get(key) or [], dtype=float)))
        if values.size:
            ax.semilogy(np.arange(values.size), np.maximum(values, tiny), ".", ms=3, label=label)
    if result.get("scale") and result.get("rel_tol"):
        ax.axhline(
            result["rel_tol"] * result["scale"],
            color="k",
            ls="--",
            lw=1,
            label=f"tolerance {result['rel_tol']:g}·max|λ|",
        )
    ax.set_xlabel("index (sorted by |λ|)")
    ax.set_ylabel("|λ| of the Hessian")
    ax.set_title(
        f"{result.get('task')} {result.get('model')}: n = {result.get('n_params')}, "
        f"orbit dim = {result.get('orbit_dim')}, flat {result.get('flat_total')} → "
        f"{result.get('flat_horizontal')}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
