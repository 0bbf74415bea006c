"""The "Transformer vs RelationalTransformer" section of the results page: equal parameters,
the sweep at equal training FLOPs, its best variant on every seed beside its dressed twin, and
every run's validation loss at the standard model's training time (equal wall-clock)."""

from __future__ import annotations

import statistics
from pathlib import Path

from . import figures
from .summaries import equal_time_steps, field, finite, mean_std

IMAGES = "img/results"


def time_budget(result: dict) -> float | None:
    """Seconds of training of the standard runs (mean logged ms/step × steps)."""
    ms = finite(field(result["runs"]["transformer"], "ms_per_step"))
    return statistics.mean(ms) * result["plan"]["steps"] / 1e3 if ms else None


def equal_time_losses(result: dict, runs: list[dict], key: str) -> list[float | None]:
    """Each run's validation loss at the last evaluation within the standard run's training
    time. With side-by-side timings (``result["timing"]``, ``key`` naming the run's model)
    the budget is a step count: standard steps × its ms/step ÷ this model's, which does not
    depend on what else ran on the machine; without them, the runs' logged training time."""
    timing = result.get("timing") or {}
    if "transformer" in timing and key in timing:
        steps = equal_time_steps(result["plan"]["steps"], timing, key)
        pick = lambda record: record["step"] <= steps * 1.001  # noqa: E731
    else:
        budget = time_budget(result)
        if budget is None:
            return [None for _ in runs]
        pick = lambda record: record["train_time"] <= budget * 1.001  # noqa: E731
    out = []
    for run in runs:
        within = [r for r in run.get("records", []) if pick(r)] if run.get("summary") else []
        out.append(within[-1]["val_loss"] if within else None)
    return out


def _row(name: str, runs: list[dict], rel: dict, key: str, flops=None) -> str:
    done = [r for r in runs if r.get("summary")]
    if not done:
        return f"| {name} | — | — | — | failed | — | — |"
    finals = [r["summary"]["final_val_loss"] for r in done]
    per_seed = ", ".join(f"{v:.3f}" if v is not None else "diverged" for v in finals)
    ms = (rel.get("timing") or {}).get(key)
    ms = statistics.mean(r["summary"]["ms_per_step"] for r in done) if ms is None else ms
    reference = rel.get("reference_flops")
    ratio = f"{flops / reference:.2f}" if flops and reference else "—"
    steps = done[0]["summary"]["steps"]
    return (
        f"| {name} | {done[0]['summary']['n_params']:,} | {ratio} | {steps} "
        f"| {mean_std(finals)} ({per_seed}) | {ms:.1f} "
        f"| {mean_std(equal_time_losses(rel, done, key))} |"
    )


def relational_section(results: dict, image_dir: Path) -> list[str]:
    rel = results["relational"]
    plan, runs = rel["plan"], rel["runs"]
    ref = rel.get("reference_flops")
    timed = "side by side in one process" if rel.get("timing") else "from the runs' logs"
    lines = [
        "## Transformer vs RelationalTransformer",
        "",
        f"Task `{plan['task']}` size `{plan['size']}`, AdamW at the standard model's tuned "
        f"setting (lr {rel['lr']:g}, wd {rel['weight_decay']:g}) for every run. *Equal "
        "parameters*: the relational channel count is chosen so its parameter count is closest "
        "to the standard model's. *Equal FLOPs*: each relational variant trains for the standard "
        "run's training FLOPs (its steps scaled by the ratio of training FLOPs per token). "
        "*Equal time*: validation loss at the last evaluation within the standard run's "
        f"training time (ms/step measured {timed}); the best variant is also trained for that "
        "time on every seed, its whole schedule fitted into it.",
        "",
        "| model | params | FLOPs/token × standard | steps | final val loss (per seed) | ms/step "
        "| val loss at equal time |",
        "|---|---|---|---|---|---|---|",
        _row("Transformer", runs["transformer"], rel, "transformer", ref),
        _row("relational, equal parameters", runs["relational"], rel, "equal_params"),
    ]
    if "best" in rel:
        best = rel["best"]
        flops = next(s["flops"] for s in rel["sweep"] if s["variant"] == best["variant"])
        name = f"relational `{best['variant']}`, lr {best['lr']:g} (best at equal FLOPs)"
        lines.append(_row(name, rel["seeds"], rel, best["variant"], flops))
        if "dressed" in rel:  # timed as its undressed twin (the dressing adds O(D³) per step)
            lines.append(_row("the same, dressed", rel["dressed"], rel, best["variant"], flops))
        if "equal_time" in rel:
            eq = rel["equal_time"]
            name = f"the same, trained for the standard run's time ({eq['steps']} steps)"
            lines.append(_row(name, eq["runs"], rel, best["variant"], flops))
        lines += ["", *_sweep(rel)]
    image = image_dir / "relational.png"
    figures.relational(_curves(rel), image)
    return lines + ["", f"![relational vs standard]({IMAGES}/{image.name})", ""]


def _sweep(rel: dict) -> list[str]:
    lines = [
        "The sweep at equal FLOPs (tuning seed; the best in bold), then the best variant's rate:",
        "",
        "| variant | params | FLOPs/token × standard | steps | final val loss | ms/step "
        "| val loss at equal time |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rel["sweep"]:
        name = f"`{s['variant']}`"
        if s["variant"] == rel["best"]["variant"]:
            name = f"**{name}**"
        lines.append(_row(name, [s], rel, s["variant"], s["flops"]))
    rates = "; ".join(
        f"{t['lr']:g}: {t['summary']['final_val_loss']:.3f}"
        if t.get("summary")
        else f"{t['lr']:g}: failed"
        for t in rel.get("lr_tuning", [])
    )
    return lines + ["", f"Learning rate of the best variant (final val loss): {rates}."]


def _curves(rel: dict) -> dict[str, list[dict]]:
    out = {
        "transformer": rel["runs"]["transformer"],
        "relational (equal params)": rel["runs"]["relational"],
    }
    if "best" in rel:
        out[f"relational {rel['best']['variant']}"] = rel["seeds"]
        if "dressed" in rel:
            out[f"relational {rel['best']['variant']}, dressed"] = rel["dressed"]
        if "equal_time" in rel:
            out[f"relational {rel['best']['variant']}, equal time"] = rel["equal_time"]["runs"]
    return out
