"""The report of ``quotopt compare``: the reference loss of a task without a target, steps to
it, the spread over gauge-transformed starts, and ``report.md``'s tables."""

from __future__ import annotations

import math
import platform
import statistics

import torch

from ..plotting import optim_of, runs_by, start_of
from ..study.robustness import relative_spread


def reference_loss(runs: list[dict]) -> float | None:
    """The loss target of a task without one: the first optimiser's mean final validation
    loss from the default start (None when the task has its own target)."""
    first = runs[0]["summary"]
    if first["target"] is not None:
        return None
    ref = [
        r["summary"]["final_val_loss"]
        for r in runs
        if optim_of(r) == optim_of(runs[0]) and start_of(r) == "default"
    ]
    ref = [v for v in ref if v is not None and math.isfinite(v)]
    return statistics.mean(ref) if ref else None


def steps_to_target(run: dict, ref: float | None) -> int | None:
    """The task's steps to target, or the first evaluated step at validation loss ≤ ``ref``."""
    s = run["summary"]
    if s["target"] is not None or ref is None:
        return s["steps_to_target"]
    hits = [r["step"] for r in run["records"] if r["val_loss"] is not None and r["val_loss"] <= ref]
    return hits[0] if hits else None


def spreads(runs: list[dict]) -> dict[str, list[float]]:
    """Optimiser → per seed, the relative spread (max − min)/median of the final validation
    loss over that seed's starts (``study.robustness.relative_spread``); empty with one start."""
    out = {}
    for optim, members in runs_by(runs).items():
        by_seed = runs_by(members, lambda r: r["summary"]["config"]["seed"])
        values = [
            relative_spread([r["summary"]["final_val_loss"] or math.inf for r in group])
            for group in by_seed.values()
            if len(group) > 1
        ]
        out[optim] = values
    return out


def _stat(values, fmt="{:.4f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _num(value, fmt="{:.4f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _hits(runs: list[dict], ref) -> str:
    reached = [h for h in (steps_to_target(r, ref) for r in runs) if h is not None]
    if not reached:
        return "not reached"
    text = _stat(reached, "{:.0f}")
    return text if len(reached) == len(runs) else f"{text} ({len(reached)}/{len(runs)})"


def report(runs: list[dict], args, wall: float, workers: int, settings: dict) -> str:
    """The Markdown report: one row per optimiser with, per start, the final target metric
    and the steps to target (mean ± sample std over seeds), the spread of the final
    validation loss over the starts and the time per step; then one row per run."""
    first = runs[0]["summary"]
    metric, target, ref = first["metric"], first["target"], reference_loss(runs)
    if target is not None:
        goal = f"val {metric} ≥ {target}"
    else:
        goal = f"val loss ≤ {_num(ref, '{:.3f}')} ({args.optims[0]}'s final, default start)"
    starts = list(runs_by(runs, start_of))
    kappas = ", ".join(f"{k:g}" for k in args.gauges)
    transformed = kappas and (
        f"; the same function in gauges of condition number κ = {kappas} (a random element of "
        "every symmetry group applied to the initial parameters)"
    )
    ms = {
        o: statistics.mean(r["summary"]["ms_per_step"] for r in g) for o, g in runs_by(runs).items()
    }
    base = ms[args.optims[0]]
    lines = [
        f"# quotopt compare: {args.task}",
        "",
        f"- model: {args.model}, size {first['config']['size']}, {first['n_params']:,} "
        f"parameters; {args.steps} steps, evaluated every {first['config']['eval_every']}; "
        f"seeds {', '.join(map(str, args.seeds))}",
        f"- starts: the default initialisation{transformed}",
        f"- target: {goal}",
        f"- machine: {platform.machine()}, torch {torch.__version__}, {workers} runs at a time, "
        f"{torch.get_num_threads() if workers == 1 else 1} torch thread(s) each, device "
        f"{first['config']['device']}; total wall time {wall:.0f} s",
        "- settings (lr, weight decay, schedule) per optimiser: "
        + "; ".join(f"{o} from {s['source']}" for o, s in settings.items()),
        "- spread: (max − min)/median of the final validation loss over the starts, per seed",
        "",
        "| optimiser | lr | weight decay | schedule "
        + "".join(f"| final val {metric}, {s} " for s in starts)
        + "".join(f"| steps to target, {s} " for s in starts)
        + "| spread over starts | ms / step | × "
        + args.optims[0]
        + " |",
        "|---" * (7 + 2 * len(starts)) + "|",
    ]
    gauge = spreads(runs)
    for optim, members in runs_by(runs).items():
        by_start = runs_by(members, start_of)
        c = members[0]["summary"]["config"]
        lines.append(
            f"| {optim} | {c['lr']:g} | {c['weight_decay']:g} | {c['schedule']} "
            + "".join(f"| {_stat([r['summary']['final'] for r in by_start[s]])} " for s in starts)
            + "".join(f"| {_hits(by_start[s], ref)} " for s in starts)
            + f"| {_stat(gauge[optim], '{:.1e}')} | {_stat([ms[optim]], '{:.1f}')} "
            + f"| {ms[optim] / base:.2f} |"
        )
    lines += [
        "",
        "Time per step is each run's own; runs of one optimiser trained side by side, others "
        "at other moments of a shared machine.",
        "",
        "Every run (steps to target: the first evaluation that reached it):",
        "",
        f"| optimiser | seed | start | final {metric} | best {metric} | steps to target | "
        "final val loss | final train loss | ms / step | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run["summary"]
        hit = steps_to_target(run, ref)
        hit = "not reached" if hit is None else str(hit)
        if s.get("diverged"):
            hit = f"diverged at {s['diverged']['step']}"
        lines.append(
            f"| {s['config']['optim']} | {s['config']['seed']} | {start_of(run)} | "
            f"{_num(s['final'])} | {_num(s['best'])} | {hit} | {_num(s['final_val_loss'])} | "
            f"{_num(s['final_train_loss'])} | {s['ms_per_step']:.1f} | {s['wall_time']:.1f} |"
        )
    for image, alt in (
        ("gauge", "validation loss from each start"),
        ("loss", "validation loss"),
        ("dynamics", "gauge dynamics"),
    ):
        lines += ["", f"![{alt}]({image}.png)"]
    return "\n".join([*lines, ""])
