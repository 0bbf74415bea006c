"""PNG figures of the CLI (matplotlib, Agg backend): the library returns data, this draws it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
import numpy as np  # noqa: E402


def _by_optim(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in runs:
        out.setdefault(run["summary"]["config"]["optim"], []).append(run)
    return out


def _curves(ax, runs: list[dict], key: str, log: bool = False) -> None:
    """Per optimiser: each seed's curve faint, the mean over seeds (common steps) bold."""
    for index, (optim, group) in enumerate(_by_optim(runs).items()):
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


def loss_plot(runs: list[dict], path, title: str = "") -> None:
    """Validation loss vs step per optimiser (faint: seeds; bold: mean)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _curves(ax, runs, "val_loss", log=True)
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dynamics_plot(runs: list[dict], path, title: str = "") -> None:
    """Mean gauge drift and mean per-head imbalance of the attention heads vs step."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _curves(axes[0], runs, "gauge_drift")
    axes[0].set_title("gauge drift ‖p − dress(p)‖ / ‖p‖", fontsize=9)
    _curves(axes[1], runs, "head_imbalance", log=True)
    axes[1].set_title("head imbalance ‖AᵀA − BᵀB‖_F", fontsize=9)
    for ax in axes:
        ax.set_ylabel("mean over attention heads")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spectrum_plot(result: dict, path) -> None:
    """Sorted |eigenvalues| (log scale) of the total and horizontal Hessians, with the
    flatness threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
