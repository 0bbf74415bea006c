"""The fine-tuning study's report: tables, the study's targets, and the figures.

Figures of a study (``protocol.study``'s result) are drawn with ``quotopt.lab.plotting``: the
validation curves at the best setting per rank (faint: seeds, bold: mean; the y-axis spans the
evaluations from the third on) and the tuning sweeps (final validation loss against the
learning rate at the best second hyperparameter, seed 0).

*Steps to reach AdamW's final loss*: the first evaluation step at which the median over seeds
of an optimiser's validation loss is at or below the median of AdamW's final losses.
"""

from __future__ import annotations

import statistics

from ..plotting import curves, new_figure, save_figure

__all__ = ["figures", "median_curve", "report", "steps_to"]

#: the tuned baselines a candidate is measured against (``targets``)
BASELINES = ("adamw", "loraplus", "lora-rite", "balora", "scaledgd")
#: how far below the best baseline's median a candidate must end, in nats per byte
MARGIN = 0.02


def _finals(entry: dict) -> list[float]:
    return [r["summary"]["final_val_loss"] for r in entry["runs"]]


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def median_curve(runs: list[dict]) -> dict[int, float]:
    """``{step: median over runs of val_loss}`` at the steps every run evaluated (finite)."""
    series = [
        {r["step"]: r["val_loss"] for r in run["records"] if r["val_loss"] is not None}
        for run in runs
    ]
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return {t: statistics.median(s[t] for s in series) for t in common}


def steps_to(runs: list[dict], target: float | None) -> int | None:
    """First step where the median curve of ``runs`` is ≤ ``target`` (None: never)."""
    if target is None:
        return None
    return next((t for t, v in median_curve(runs).items() if v <= target), None)


def _setting(optim: str, best: dict) -> str:
    edge = " (grid edge)" if best.get("edge") else ""
    extra = "".join(
        f", {k} {best[k]:g}" + (" (grid edge)" if best.get(f"{k}_edge") else "")
        for k in ("ratio", "damping")
        if k in best
    )
    return f"{best['lr']:g}{edge}{extra}"


def _fmt(value, fmt="{:.4f}") -> str:
    return "—" if value is None else fmt.format(value)


def _main_table(results: dict) -> list[str]:
    lines = [
        "| rank | optimiser | best setting (seed 0) | final val loss, median (min–max) | "
        "Δ vs AdamW (< 0: below) | steps to AdamW's final | ms / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank, entries in results.items():
        adamw = entries.get("adamw")
        target = _median(_finals(adamw)) if adamw else None
        for optim, entry in entries.items():
            finals = [v for v in _finals(entry) if v is not None]
            med = _median(finals)
            spread = f" ({min(finals):.4f}–{max(finals):.4f})" if len(finals) > 1 else ""
            delta = None if med is None or target is None else med - target
            hit = steps_to(entry["runs"], target)
            ms = _median([r["summary"]["ms_per_step"] for r in entry["runs"]])
            diverged = sum(r["summary"]["diverged"] is not None for r in entry["runs"])
            note = f", {diverged} diverged" if diverged else ""
            lines.append(
                f"| {rank} | {optim} | {_setting(optim, entry['best'])} | {_fmt(med)}{spread}"
                f"{note} | {_fmt(delta, '{:+.4f}')} | {_fmt(hit, '{:d}')} | {_fmt(ms, '{:.1f}')} |"
            )
    return lines


def _transfer_table(results: dict) -> list[str]:
    ranks = list(results)
    optims = list(dict.fromkeys(o for entries in results.values() for o in entries))
    lines = [
        "| optimiser | " + " | ".join(f"best lr, r = {r}" for r in ranks) + " | one lr? |",
        "|---|" + "---|" * (len(ranks) + 1),
    ]
    for optim in optims:
        lrs = [results[r][optim]["best"]["lr"] if optim in results[r] else None for r in ranks]
        same = "yes" if len({lr for lr in lrs if lr is not None}) == 1 else "no"
        lines.append(f"| {optim} | " + " | ".join(_fmt(lr, "{:g}") for lr in lrs) + f" | {same} |")
    return lines


def _tuning_table(results: dict) -> list[str]:
    lines = [
        "| rank | optimiser | lr | ratio / damping | final val loss (seed 0) |",
        "|---|---|---|---|---|",
    ]
    for rank, entries in results.items():
        for optim, entry in entries.items():
            for s in sorted(entry["tuning"], key=lambda s: s["config"]["lr"]):
                c = s["config"]
                extra = {"loraplus": f"ratio {c['ratio']:g}"}.get(optim, "")
                if optim in ("qadam-inv", "qsgd-inv", "scaledgd"):
                    extra = f"damping {c['damping']:g}"
                final = _fmt(s["final_val_loss"]) if not s["diverged"] else "diverged"
                lines.append(f"| {rank} | {optim} | {c['lr']:g} | {extra} | {final} |")
    return lines


def targets(results: dict) -> list[str]:
    """The study's target, one line per rank and candidate (every optimiser that is not one of
    the ``BASELINES``): its median final loss against the best median of the tuned baselines
    present, met when it is at least ``MARGIN`` nats below and every seed of it ends below
    that baseline's best seed (outside the seed ranges)."""
    lines = []
    for rank, entries in results.items():
        base = {o: _finals(entries[o]) for o in BASELINES if o in entries}
        base = {o: f for o, f in base.items() if _median(f) is not None}
        if not base:
            continue
        best = min(base, key=lambda o: _median(base[o]))
        reference, floor = _median(base[best]), min(v for v in base[best] if v is not None)
        for optim in (o for o in entries if o not in BASELINES):
            finals = _finals(entries[optim])
            q = _median(finals)
            if q is None:
                lines.append(f"- r = {rank}, {optim}: no finite final loss")
                continue
            gain = reference - q
            outside = all(v is not None and v < floor for v in finals)
            met = gain >= MARGIN and outside
            lines.append(
                f"- r = {rank}, {optim}: {q:.4f} vs the best tuned baseline ({best}) "
                f"{reference:.4f}, {_side(gain)}; every seed below its best seed: "
                f"{'yes' if outside else 'no'} (target: ≥ {MARGIN} below, outside the seed "
                f"ranges): {'met' if met else 'missed'}"
            )
    return lines


def _side(gap: float) -> str:
    """``gap`` = other − ours as words: how far below (ahead) or above (behind)."""
    return f"{abs(gap):.4f} nats {'below' if gap > 0 else 'above'}"


def report(results: dict, meta: dict, images: dict[str, str]) -> str:
    """Markdown: the setting (``meta``: ``title``, ``lines``), the main table, the lr transfer
    table, the targets, the figures (``images``: caption → path) and every tuning run."""
    lines = [f"# {meta.get('title', 'LoRA fine-tuning on the quotient')}", ""]
    lines += [f"- {line}" for line in meta.get("lines", ())] + [""]
    lines += [
        "Final validation loss in nats per byte on the task's held-out validation split; "
        "median over seeds at each optimiser's best setting.",
        "",
    ]
    lines += _main_table(results) + ["", "Best learning rate per rank:", ""]
    lines += _transfer_table(results) + ["", "Targets:", ""] + targets(results) + [""]
    for caption, path in images.items():
        lines += [f"![{caption}]({path})", ""]
    lines += ["Every tuning run (seed 0):", ""] + _tuning_table(results) + [""]
    return "\n".join(lines)


def figures(results: dict, curves_path, lr_path) -> None:
    """The validation curves per rank and the lr sweeps per rank (module docstring)."""
    ranks = list(results)
    fig, axes = new_figure(1, len(ranks), figsize=(4.5 * len(ranks), 3.8), squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        runs = [run for entry in results[rank].values() for run in entry["runs"]]
        curves(ax, runs, "val_loss")
        late = [r["val_loss"] for run in runs for r in run["records"][2:] if r["val_loss"]]
        if late:  # the first evaluations (from the pretrained model's loss) off the scale
            ax.set_ylim(min(late) - 0.02, max(late) + 0.02)
        ax.set_title(f"r = {rank}", fontsize=10)
        ax.set_ylabel("validation loss (nats / byte)")
    save_figure(fig, curves_path)
    fig, axes = new_figure(1, len(ranks), figsize=(4.5 * len(ranks), 3.8), squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        for index, (optim, entry) in enumerate(results[rank].items()):
            pts = sorted(
                (s["config"]["lr"], s["final_val_loss"])
                for s in entry["tuning"]
                if s["final_val_loss"] is not None and _is_main(s, entry)
            )
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{index}", label=optim, ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final val loss, seed 0")
        ax.set_title(f"r = {rank}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, lr_path)


def _is_main(summary: dict, entry: dict) -> bool:
    """Whether a tuning run used the best second hyperparameter (the curve of the lr sweep)."""
    c, best = summary["config"], entry["best"]
    return all(c[k] == best[k] for k in ("ratio", "damping") if k in best)
