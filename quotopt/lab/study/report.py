"""``docs/results.md`` from the study's results: the target verdicts, one table per task (every
seed, robustness to hyperparameters and to the gauge), the tuning grids, relational vs standard,
flat directions."""

from __future__ import annotations

import math
from pathlib import Path

from . import figures
from .flat import flat_markdown
from .protocol import LABELS, ROLES, SGD_LIKE, Grid
from .relational_report import relational_section
from .robustness import LOSS_MARGIN, STEPS_FACTOR, basin_share, gauge_spread, seeds_reaching
from .summaries import (
    field,
    gauge_floor,
    mean_std,
    median_steps,
    spread_text,
    step_ms,
    steps_text,
    training_seconds,
)
from .targets import targets
from .tuning import bracket

IMAGES = "img/results"


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


def _grid(plan: dict, optim: str) -> Grid:
    g = plan["sgd_grid" if optim in SGD_LIKE else "adam_grid"]
    return Grid(tuple(g["lrs"]), tuple(g["weight_decays"]))


def _brackets(entry: dict, optim: str) -> dict[str, str]:
    tuned = entry["tuning"][optim]
    settings = [(t["lr"], t["weight_decay"]) for t in tuned]
    return bracket(_grid(entry["plan"], optim), settings, tuple(entry["best"][optim]))


def _robustness(entry: dict, optim: str, criterion: str) -> tuple[str, str, str]:
    """(seeds reaching the target, basin share, gauge spread) as table cells."""
    runs = entry["runs"][optim]
    reached, n = seeds_reaching(runs)
    seeds = f"{reached}/{n}" if entry["plan"]["stop_at_target"] or criterion != "loss" else "—"
    initial = _grid(entry["plan"], optim).settings()
    share, k = basin_share(entry["tuning"][optim], initial, criterion)
    basin = f"{share:.0%} of {k}" if k else "—"
    gauge = entry.get("gauge", {}).get(optim)
    if not gauge:
        return seeds, basin, "—"
    spread = gauge_spread(gauge)
    text = f"loss {spread_text(spread['loss'])}"
    if "steps" in spread:
        text += f"; steps {spread_text(spread['steps'])}"
    return seeds, basin, text


def _gauge_who(plan: dict) -> str:
    who = plan.get("gauge_optims")
    if who is None or set(plan["optims"]) <= set(who):
        return ""
    names = ", ".join(LABELS.get(o, o) for o in who)
    return f", measured for {names} (the baselines are tuned, bracketed and seeded only)"


def task_section(task: str, entry: dict, image_dir: Path) -> list[str]:
    plan, runs, best = entry["plan"], entry["runs"], entry["best"]
    criterion, cap = plan["criterion"], plan["steps"]
    summaries = [r.get("summary") for group in runs.values() for r in group]
    entry["metric"] = metric = _metric(summaries)
    adam_ms = step_ms(entry, "adamw") if "adamw" in runs else math.nan
    head = {
        "steps": f"steps to val {metric} ≥ target (median; per seed)",
        "loss": "final val loss (mean ± std; per seed)",
        "accuracy": "final val accuracy (mean ± std; per seed)",
    }[criterion]
    basin_rule = (
        f"reached the target in ≤ {STEPS_FACTOR:g}× the best setting's steps"
        if criterion == "steps"
        else f"ended within {LOSS_MARGIN:g} nats of the best setting's validation loss"
    )
    lines = [
        f"## {task}",
        "",
        f"Size `{plan['size']}`, {cap} steps"
        + (", stopped at the target" if plan["stop_at_target"] else "")
        + f", {plan.get('schedule', 'constant')} learning rate, evaluated every "
        f"{plan['eval_every']}; tuned on seed {plan['tune_seed']}, seeds "
        f"{', '.join(map(str, plan['seeds']))} at the best setting. *Basin*: the share of the "
        f"starting grid's settings that {basin_rule}. *Gauge spread*: relative spread "
        "(max − min)/median over starts from the same initial function in gauges of condition "
        f"number κ ∈ {{{', '.join(f'{k:g}' for k in plan.get('gauge_conditions', ()))}}}"
        + _gauge_who(plan)
        + ".",
        "",
        f"| optimiser | lr | wd | {head} | final val loss | ms/step | × AdamW | seeds at target "
        "| basin | gauge spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    edges, bounds = [], []
    for optim, group in runs.items():
        lr, wd = best[optim]
        where = _brackets(entry, optim)
        edge = [axis for axis, w in where.items() if w == "edge"]
        if edge:
            edges.append(f"{LABELS.get(optim, optim)} ({', '.join(edge)})")
        bounds += [
            f"{LABELS.get(optim, optim)} ({a} {w})"
            for a, w in where.items()
            if w in ("bound", "fixed")
        ]
        per_seed = ", ".join(_seed_value(r, criterion, cap) for r in group)
        if criterion == "steps":
            value = steps_text(median_steps(group), cap)
        else:
            value = mean_std(field(group, "final" if criterion == "accuracy" else "final_val_loss"))
        ms = step_ms(entry, optim)
        ms_text = f"{ms:.1f}" if math.isfinite(ms) else "—"
        ratio = f"{ms / adam_ms:.2f}" if math.isfinite(ms / adam_ms) else "—"
        seeds, basin, spread = _robustness(entry, optim, criterion)
        lines.append(
            f"| {LABELS.get(optim, optim)}{' †' if edge else ''} | {lr:g} | {wd:g} "
            f"| {value} ({per_seed}) | {mean_std(field(group, 'final_val_loss'))} "
            f"| {ms_text} | {ratio} | {seeds} | {basin} | {spread} |"
        )
    notes = []
    if edges:
        notes.append(
            "† best setting still on an edge of its grid after the allowed extensions, so a "
            "wider grid may do better: " + "; ".join(edges) + "."
        )
    if bounds:
        notes.append("At a bound or fixed by the plan (not an edge): " + "; ".join(bounds) + ".")
    lines += ["", *notes] if notes else []
    image = image_dir / f"{task}.png"
    figures.task_curves(task, entry, image)
    lines += ["", f"![{task} curves]({IMAGES}/{image.name})", ""]
    lines += _gauge_table(task, entry, criterion, cap, image_dir)
    lines += _tuning_table(entry, criterion, cap)
    return lines


def _gauge_table(task: str, entry: dict, criterion: str, cap: int, image_dir: Path) -> list[str]:
    gauge = entry.get("gauge")
    if not gauge:
        return []
    kappas = [r["gauge_condition"] for r in next(iter(gauge.values()))]
    trips = entry.get("gauge_round_trip", {})
    lines = [
        "Outcome from gauge-transformed starts (tuning seed, best setting; κ = condition number "
        "of the random head elements applied to the initial parameters). *Round trip*: the "
        f"start transformed by g and back by g⁻¹ at κ = {max(kappas):g}, the same gauge with "
        "the transformations' round-off; *floor*: its relative difference from the "
        "untransformed run, the part of the spread that round-off alone causes.",
        "",
        "| optimiser | "
        + " | ".join(f"κ = {k:g}" for k in kappas)
        + " | spread (final loss) | round trip | floor |",
        "|---|" + "---|" * (len(kappas) + 3),
    ]
    for optim, runs in gauge.items():
        cells = [_seed_value(r, criterion, cap) for r in runs]
        trip = trips.get(optim, [])
        trip_cell = _seed_value(trip[0], criterion, cap) if trip else "—"
        lines.append(
            f"| {LABELS.get(optim, optim)} | {' | '.join(cells)} "
            f"| {spread_text(gauge_spread(runs)['loss'])} | {trip_cell} "
            f"| {spread_text(gauge_floor(entry, optim))} |"
        )
    image = image_dir / f"{task}-gauge.png"
    key = "steps_to_target" if criterion == "steps" else "final_val_loss"
    figures.gauge(task, entry, key, image)
    return lines + ["", f"![{task} gauge robustness]({IMAGES}/{image.name})", ""]


def _tuning_table(entry: dict, criterion: str, cap: int) -> list[str]:
    lines = [
        "<details><summary>Tuning grid (tuning seed; the chosen setting in bold; settings "
        "added by bracketing in italics)</summary>",
        "",
        "| optimiser | lr / wd: result |",
        "|---|---|",
    ]
    for optim, tuned in entry["tuning"].items():
        initial = set(_grid(entry["plan"], optim).settings())
        cells = []
        for t in tuned:
            text = f"{t['lr']:g}/{t['weight_decay']:g}: {_seed_value(t, criterion, cap)}"
            if (t["lr"], t["weight_decay"]) not in initial:
                text = f"*{text}*"
            chosen = (t["lr"], t["weight_decay"]) == tuple(entry["best"][optim])
            cells.append(f"**{text}**" if chosen else text)
        lines.append(f"| {LABELS.get(optim, optim)} | {'; '.join(cells)} |")
    return lines + ["", "</details>", ""]


def flat_section(results: dict, image_dir: Path) -> list[str]:
    """The unrefined experiment (``FlatPlan.weight_decays``) where the plan ran it, then the
    counts at refined critical points (``FlatPlan.settings``, ``flat.flat_markdown``)."""
    lines = _unrefined(results.get("flat") or [], image_dir)
    critical = results.get("critical") or []
    return lines + ([flat_markdown(critical), ""] if critical else [])


def _unrefined(reports: list[dict], image_dir: Path) -> list[str]:
    if not reports:
        return []
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


def optimisers_section(results: dict) -> list[str]:
    """One line per optimiser of the study: its label and what it does to the symmetry."""
    seen = dict.fromkeys(o for entry in results["tasks"].values() for o in entry["plan"]["optims"])
    lines = ["## Optimisers", ""]
    lines += [f"- **{LABELS.get(o, o)}** (`{o}`): {ROLES.get(o, '')}".rstrip() for o in seen]
    return lines + [""]


def write_report(results: dict, docs_dir, command: str) -> Path:
    """Write ``docs_dir/results.md`` and its figures; returns the page's path."""
    docs_dir = Path(docs_dir)
    image_dir = docs_dir / IMAGES
    image_dir.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    n_runs, seconds = training_seconds(results)
    workers = max(1, results["workers"])  # 0: trained in the calling process
    body = []
    for task, entry in results["tasks"].items():
        body += task_section(task, entry, image_dir)
    lines = [
        "# Results",
        "",
        f"Produced by `{command}` (plan `{results['plan']}`), this invocation in "
        f"{results['wall_time'] / 60:.1f} min on {m['cpus']} CPU cores ({m['cpu']}), "
        f"{results['workers']} worker processes of one thread each, torch {m['torch']}, "
        f"Python {m['python']}. Its {n_runs} training runs took {seconds / 3600:.1f} CPU-hours "
        "in all (the sum of their own wall times, one thread each, over every invocation "
        f"that `--resume` continued: ≈ {seconds / 3600 / workers:.1f} h on "
        f"{workers} workers). Every number on this page is computed from the runs "
        "by the command; nothing is edited by hand. See [the study](study.md) for the protocol "
        "and the discussion.",
        "",
    ]
    lines += optimisers_section(results) + targets(results) + body
    lines += relational_section(results, image_dir)
    lines += flat_section(results, image_dir)
    lines += dynamics_section(results, image_dir)
    page = docs_dir / "results.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
