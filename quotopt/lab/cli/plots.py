"""PNG figures of the CLI, drawn with ``quotopt.lab.plotting``: the library returns data, this
draws it."""

from __future__ import annotations

import numpy as np

from ..plotting import curves, new_figure, optim_of, runs_by, save_figure, start_of

LINESTYLES = ("-", "--", ":", "-.")


def _starts(runs: list[dict]) -> list[str]:
    return list(runs_by(runs, start_of))


def _optim_and_start(runs: list[dict]):
    """(group, style) for ``curves``: one curve per optimiser and start, coloured by the
    optimiser, dashed for each gauge-transformed start."""
    optims, starts = list(runs_by(runs)), _starts(runs)

    def group(run):
        return f"{optim_of(run)}, {start_of(run)}"

    def style(label, index):
        optim, start = label.split(", ", 1)
        return dict(color=f"C{optims.index(optim)}", ls=LINESTYLES[starts.index(start) % 4])

    return group, style


def _spans_decades(runs: list[dict], key: str) -> bool:
    """Whether the positive values of ``record[key]`` span more than a factor of ten (then a
    log axis reads better)."""
    values = [r[key] for run in runs for r in run["records"] if (r.get(key) or 0) > 0]
    return bool(values) and max(values) > 10 * min(values)


def loss_plot(runs: list[dict], path, title: str = "") -> None:
    """Validation loss vs step per optimiser, from the default start (faint: seeds; bold:
    their mean)."""
    fig, ax = new_figure(figsize=(6, 4))
    curves(ax, [r for r in runs if start_of(r) == "default"], "val_loss", log=True)
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def gauge_plot(runs: list[dict], path, title: str = "", titles: dict | None = None) -> None:
    """One panel per optimiser, validation loss vs step from each start: the default
    initialisation (solid) and the same function in ill-conditioned gauges (dashed). An
    optimiser whose outcome depends on the gauge shows split curves. ``titles``: optimiser →
    its panel's title (default: its name)."""
    by_optim = runs_by(runs)
    n = len(by_optim)
    cols = 2 if n in (2, 4) else min(n, 3)
    rows = -(-n // cols)
    fig, axes = new_figure(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    starts = _starts(runs)
    shared = axes[0, 0]
    for index, (optim, members) in enumerate(by_optim.items()):
        ax = axes.flat[index]
        if ax is not shared:
            ax.sharey(shared)

        def style(label, _, color=f"C{index}"):
            return dict(color=color, ls=LINESTYLES[starts.index(label) % 4])

        curves(
            ax,
            members,
            "val_loss",
            log=_spans_decades(runs, "val_loss"),
            group=start_of,
            style=style,
        )
        ax.set_title((titles or {}).get(optim, optim), fontsize=9)
        ax.set_ylabel("validation loss")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def dynamics_plot(runs: list[dict], path, title: str = "") -> None:
    """Mean balance gap and mean head imbalance of the attention heads vs step, per optimiser
    and start."""
    group, style = _optim_and_start(runs)
    fig, axes = new_figure(1, 2, figsize=(11, 4.2))
    curves(axes[0], runs, "balance_gap", log=True, group=group, style=style)
    axes[0].set_title(
        "distance to the balanced section: balance gap ‖AᵀA − BᵀB‖/‖AᵀA + BᵀB‖\n"
        "(0 on every balanced point, whatever its rotation inside the section)",
        fontsize=9,
    )
    curves(axes[1], runs, "head_imbalance", log=True, group=group, style=style)
    axes[1].set_title("head imbalance ‖AᵀA − BᵀB‖_F (conserved by gradient flow)", fontsize=9)
    for ax in axes:
        ax.set_ylabel("mean over attention heads")
        if ax.get_legend() is not None:
            ax.legend(fontsize=7, ncol=2)
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
