"""``docs/results.md`` from the study's results: one table per task (every seed), the tuning
grids, target verdicts computed from the data, relational vs standard, flat directions."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from . import figures
from .protocol import LABELS

IMAGES = "img/results"


def _field(runs: list[dict], key: str) -> list:
    """``summary[key]`` of every run (None for a run that failed before writing a summary)."""
    return [(run.get("summary") or {}).get(key) for run in runs]


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_std(values, digits=3) -> str:
    values = _finite(values)
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def median_steps(runs: list[dict]) -> float:
    """Median steps to target over seeds; a seed that never reached it counts as ∞."""
    steps = _field(runs, "steps_to_target")
    return statistics.median([math.inf if s is None else s for s in steps]) if steps else math.inf


def _ms(runs):
    return _finite(_field(runs, "ms_per_step"))


def _seed_value(run: dict, criterion: str, cap: int) -> str:
    s = run.get("summary")
    if s is None:
        return f"failed ({run.get('error', '?')[:60]})"
    if s.get("diverged"):
        return f"diverged at {s['diverged']['step']}"
    if criterion == "steps":
        return str(s["steps_to_target"]) if s["steps_to_target"] is not None else f">{cap}"
    if criterion == "accuracy":
        return f"{s['final']:.3f}" if s["final"] is not None else "diverged"
    return f"{s['final_val_loss']:.3f}" if s["final_val_loss"] is not None else "diverged"


def _metric(summary_list: list[dict]) -> str:
    return next((s["metric"] for s in summary_list if s), "loss")


def task_section(task: str, entry: dict, image_dir: Path) -> list[str]:
    plan, runs, best = entry["plan"], entry["runs"], entry["best"]
    criterion, cap = plan["criterion"], plan["steps"]
    summaries = [r.get("summary") for group in runs.values() for r in group]
    entry["metric"] = metric = _metric(summaries)
    adam_ms = statistics.mean(_ms(runs["adamw"])) if _ms(runs.get("adamw", [])) else None
    head = {
        "steps": f"steps to val {metric} ≥ target (median; per seed)",
        "loss": "final val loss (mean ± std; per seed)",
        "accuracy": "final val accuracy (mean ± std; per seed)",
    }[criterion]
    lines = [
        f"## {task}",
        "",
        f"Size `{plan['size']}`, {cap} steps"
        + (", stopped at the target" if plan["stop_at_target"] else "")
        + f", evaluated every {plan['eval_every']}; tuned on seed {plan['tune_seed']}, "
        f"seeds {', '.join(map(str, plan['seeds']))} at the best setting. A grid axis with "
        "two values has every setting on an edge: read a best setting there as a bracket.",
        "",
        f"| optimiser | lr | wd | {head} | final val loss | ms/step | × AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    edges = []
    for optim, group in runs.items():
        lr, wd = best[optim]
        edge = _grid_edge(entry["tuning"][optim], lr, wd)
        if edge:
            edges.append(f"{LABELS.get(optim, optim)} ({edge})")
        per_seed = ", ".join(_seed_value(r, criterion, cap) for r in group)
        if criterion == "steps":
            med = median_steps(group)
            value = f"{med:g}" if math.isfinite(med) else f">{cap}"
        else:
            key = "final" if criterion == "accuracy" else "final_val_loss"
            value = mean_std(_field(group, key))
        losses = mean_std(_field(group, "final_val_loss"))
        ms = _ms(group)
        ms_text = f"{statistics.mean(ms):.1f}" if ms else "—"
        ratio = f"{statistics.mean(ms) / adam_ms:.2f}" if ms and adam_ms else "—"
        lines.append(
            f"| {LABELS.get(optim, optim)}{' †' if edge else ''} | {lr:g} | {wd:g} "
            f"| {value} ({per_seed}) | {losses} "
            f"| {ms_text} | {ratio} |"
        )
    if edges:
        lines += [
            "",
            "† best setting on the edge of the grid, so a wider grid may do better: "
            + "; ".join(edges)
            + ". A tie on the edge counts too (the first setting in grid order wins a tie).",
        ]
    image = image_dir / f"{task}.png"
    figures.task_curves(task, entry, image)
    lines += ["", f"![{task} curves]({IMAGES}/{image.name})", ""]
    lines += _tuning_table(entry, criterion, cap)
    return lines


def _grid_edge(tuned: list[dict], lr: float, wd: float) -> str:
    """Which of lr / wd is at the top or bottom of a grid axis with three or more values (with
    two values every setting is on an edge; the page says so once)."""
    out = []
    for name, value, key in (("lr", lr, "lr"), ("wd", wd, "weight_decay")):
        values = sorted({t[key] for t in tuned})
        if len(values) > 2 and value in (values[0], values[-1]):
            out.append(f"{name} {'lowest' if value == values[0] else 'highest'}")
    return ", ".join(out)


def _tuning_table(entry: dict, criterion: str, cap: int) -> list[str]:
    lines = [
        "<details><summary>Tuning grid (tuning seed; the chosen setting in bold)</summary>",
        "",
        "| optimiser | lr / wd: result |",
        "|---|---|",
    ]
    for optim, tuned in entry["tuning"].items():
        cells = []
        for t in tuned:
            text = f"{t['lr']:g}/{t['weight_decay']:g}: {_seed_value(t, criterion, cap)}"
            chosen = (t["lr"], t["weight_decay"]) == tuple(entry["best"][optim])
            cells.append(f"**{text}**" if chosen else text)
        lines.append(f"| {LABELS.get(optim, optim)} | {'; '.join(cells)} |")
    return lines + ["", "</details>", ""]


def _steps(value: float, cap: int) -> str:
    return f"{value:g}" if math.isfinite(value) else f">{cap}"


def targets(results: dict) -> list[str]:
    """The issue's targets, each with the measured figures and met / missed."""
    tasks, lines = results["tasks"], ["## Targets", ""]
    lines += ["| target | measured | verdict |", "|---|---|---|"]
    if "modadd" in tasks:
        runs = tasks["modadd"]["runs"]
        cap = tasks["modadd"]["plan"]["steps"]
        base, base_ms = median_steps(runs["adamw"]), _ms(runs["adamw"])
        for optim in ("qadam", "qadam-inv"):
            if optim not in runs:
                continue
            steps, ms = median_steps(runs[optim]), _ms(runs[optim])
            ratio = steps / base if math.isfinite(steps) and math.isfinite(base) else math.nan
            wall = statistics.mean(ms) / statistics.mean(base_ms) if ms and base_ms else math.nan
            met = ratio <= 0.5 and wall <= 1.5
            lines.append(
                f"| modadd: {LABELS[optim]} ≤ 0.5× AdamW's steps to 99 % at ≤ 1.5× time/step "
                f"| {_steps(steps, cap)} vs {_steps(base, cap)} steps"
                f"{f' (×{ratio:.2f})' if math.isfinite(ratio) else ''}; "
                f"×{wall:.2f} time/step "
                f"| {'met' if met else 'missed'} |"
            )
    if "chars" in tasks:
        runs = tasks["chars"]["runs"]
        base = _finite(_field(runs["adamw"], "final_val_loss"))
        base_steps = statistics.median(_finite(_field(runs["adamw"], "steps")) or [math.nan])
        for optim in ("qadam", "qadam-inv"):
            if optim not in runs or not base:
                continue
            ours, base_loss = _finite(_field(runs[optim], "final_val_loss")), statistics.mean(base)
            gain = base_loss - statistics.mean(ours) if ours else math.nan
            reach = []
            for run in runs[optim]:
                hits = [
                    r["step"]
                    for r in run.get("records", [])
                    if r["val_loss"] is not None and r["val_loss"] <= base_loss
                ]
                reach.append(hits[0] if hits else math.inf)
            frac = statistics.median(reach) / base_steps
            met = gain >= 0.03 or frac <= 0.8
            reached = (
                f"AdamW's final loss at ×{frac:.2f} of the steps"
                if math.isfinite(frac)
                else "AdamW's final loss not reached (median over seeds)"
            )
            lines.append(
                f"| chars: {LABELS[optim]} ≥ 0.03 nats below AdamW, or AdamW's loss in ≤ 0.8× "
                f"steps | {-gain:+.3f} nats vs AdamW; {reached} | {'met' if met else 'missed'} |"
            )
    rel = results["relational"]["runs"]
    std = _finite(_field(rel["transformer"], "final_val_loss"))
    ours = _finite(_field(rel["relational"], "final_val_loss"))
    if std and ours:
        gap = statistics.mean(ours) - statistics.mean(std)
        lines.append(
            f"| relational within 0.05 nats of the standard model at equal parameters "
            f"| {gap:+.3f} nats | {'met' if gap <= 0.05 else 'missed'} |"
        )
    return lines + [""]


def relational_section(results: dict, image_dir: Path) -> list[str]:
    rel = results["relational"]
    plan, runs = rel["plan"], rel["runs"]
    lines = [
        "## Transformer vs RelationalTransformer",
        "",
        f"Task `{plan['task']}` size `{plan['size']}`, {plan['steps']} steps, AdamW at the "
        f"standard model's tuned setting (lr {rel['lr']:g}, wd {rel['weight_decay']:g}) for "
        "both. *Equal parameters*: the relational channel count is chosen so its parameter "
        "count is closest to the standard model's. *Equal compute*: the relational run's "
        "validation loss at the last evaluation within the standard run's training time.",
        "",
        "| model | params | final val loss (per seed) | ms/step | val loss at equal time |",
        "|---|---|---|---|---|",
    ]
    budget = _finite(_field(runs["transformer"], "ms_per_step"))
    budget = statistics.mean(budget) * plan["steps"] / 1e3 if budget else None
    for model, group in runs.items():
        done = [r for r in group if r.get("summary")]
        if not done:
            lines.append(f"| {model} | — | failed | — | — |")
            continue
        finals = [r["summary"]["final_val_loss"] for r in done]
        per_seed = ", ".join(f"{v:.3f}" for v in finals)
        at_time = []
        for run in done:
            within = [r for r in run["records"] if budget and r["train_time"] <= budget * 1.001]
            at_time.append(within[-1]["val_loss"] if within else None)
        ms = statistics.mean(r["summary"]["ms_per_step"] for r in done)
        lines.append(
            f"| {model} | {done[0]['summary']['n_params']:,} | {mean_std(finals)} ({per_seed}) "
            f"| {ms:.1f} | {mean_std(at_time)} |"
        )
    image = image_dir / "relational.png"
    figures.relational(runs, image)
    return lines + ["", f"![relational vs standard]({IMAGES}/{image.name})", ""]


def flat_section(results: dict, image_dir: Path) -> list[str]:
    reports = results["flat"]
    lines = [
        "## Flat directions of modadd",
        "",
        "Hessian of the full-batch objective f + (λ/2)‖θ‖² over all parameters (float64, dense) "
        "at the end of full-batch Adam training with coupled L2 decay λ and a cosine schedule. "
        "*orbit dim*: the dimension of the symmetry orbits (GL(r) per head pair, positive "
        "rescaling per ReLU unit); *compact*: the part that preserves ‖θ‖² (O(r) per head "
        "pair; no rescaling direction), the only orbits that stay level sets of the objective "
        "when λ > 0. *flat*: eigenvalues with |λᵢ| ≤ 1e-8·max|λᵢ|; *horizontal*: the same "
        "count for the Hessian restricted to the horizontal space.",
        "",
        "| λ | params | orbit dim | compact | flat total | flat horizontal | total − horizontal "
        "| vertical tangents flat | ‖∇F‖ | val acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        if "error" in r:
            lines.append(f"| — | failed: {r['error'][:80]} |||||||||")
            continue
        drop = r["flat_total"] - r["flat_horizontal"]
        lines.append(
            f"| {r['objective_weight_decay']:g} | {r['n_params']} | {r['orbit_dim']} "
            f"| {r['compact_orbit_dim']} | {r['flat_total']} | {r['flat_horizontal']} | {drop} "
            f"| {r['vertical_flat']} of {r['orbit_dim']} | {r['grad_norm']:.1e} "
            f"| {r['val_accuracy']:.3f} |"
        )
    image = image_dir / "flat.png"
    figures.flat_counts(reports, image)
    return lines + ["", f"![flat directions by tolerance]({IMAGES}/{image.name})", ""]


def dynamics_section(results: dict, image_dir: Path, task: str = "modadd") -> list[str]:
    if task not in results["tasks"]:
        return []
    image = image_dir / "dynamics.png"
    figures.dynamics(task, results["tasks"][task], image)
    return [
        "## Gauge dynamics",
        "",
        f"Mean over attention heads on `{task}`, every optimiser at its best setting: "
        "*gauge drift* = relative distance of the parameters from the dressed representative "
        "of their own orbit; *head imbalance* = ‖AᵀA − BᵀB‖ per head (the Noether charge of "
        "GL(r), conserved by gradient flow); *balance gap* = the same relative to ‖AᵀA + BᵀB‖. "
        "Models without head symmetries (random biases) have none.",
        "",
        f"![gauge dynamics]({IMAGES}/{image.name})",
        "",
    ]


def write_report(results: dict, docs_dir, command: str) -> Path:
    """Write ``docs_dir/results.md`` and its figures; returns the page's path."""
    docs_dir = Path(docs_dir)
    image_dir = docs_dir / IMAGES
    image_dir.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    body = []
    for task, entry in results["tasks"].items():
        body += task_section(task, entry, image_dir)
    lines = [
        "# Results",
        "",
        f"Produced by `{command}` (plan `{results['plan']}`) in "
        f"{results['wall_time'] / 60:.1f} min on {m['cpus']} CPU cores ({m['cpu']}), "
        f"{results['workers']} worker processes of one thread each, torch {m['torch']}, "
        f"Python {m['python']}. Every number on this page is computed from the runs by the "
        "command; nothing is edited by hand. See [the study](study.md) for the protocol and "
        "the discussion.",
        "",
    ]
    lines += targets(results) + body
    lines += relational_section(results, image_dir)
    lines += flat_section(results, image_dir)
    lines += dynamics_section(results, image_dir)
    page = docs_dir / "results.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
