"""The flat-direction phase of the study: counts at refined critical points of models that learn.

``critical_job(setting, seed, directory)`` runs ``quotopt.lab.experiments.critical.count_setting``
for
one setting (modadd at λ > 0 with the heads' and the joint reduction, the λ = 0 teacher
regression, the relational model with its declared reduction and the control without channels)
and caches the JSON; ``flat_markdown(results)`` renders the "Flat directions" section of the
study page. Run the phase alone with

    python -m quotopt.lab.study.flat --plan standard --out DIR

which writes ``DIR/flat.json`` (the list ``flat_markdown`` reads) and ``DIR/flat.md``.

``flat_job`` is the earlier experiment (``FlatPlan.size/steps/lr/weight_decays``): a ReLU
modadd model at the end of Adam training, counted without refinement, kept for the study runner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ...dynamics import model_flat_directions
from .. import training

PAPER = (
    "François & Ravera (arXiv 2602.18948) claim that training on the quotient of the parameter "
    "space by the network's symmetry group has no symmetry-induced flat directions: every flat "
    "direction of the loss that a symmetry causes is vertical, so the Hessian restricted to the "
    "horizontal space has none."
)


# ---- the refined counts ----------------------------------------------------------------------
def critical_job(setting: str, seed: int, directory: str, steps: int | None = None) -> dict:
    """``count_setting(setting, seed=seed)`` (Adam ``steps`` if given), cached as
    ``directory/<setting>.json`` and reused while the setting is unchanged; an exception
    becomes ``{"setting": …, "error": …}``."""
    from ..experiments.critical import count_setting

    path = Path(directory) / f"{setting}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("setting") == _as_run(setting, steps):
            return cached  # a setting changed since is counted again
    try:
        result = count_setting(setting, seed=seed, **({} if steps is None else {"steps": steps}))
    except Exception as err:  # noqa: BLE001 - reported on the page, not fatal to the study
        return dict(setting={"name": setting}, error=f"{type(err).__name__}: {err}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _as_run(setting: str, steps: int | None) -> dict | None:
    """The ``setting`` field that ``count_setting`` writes for this job (as JSON reads it)."""
    from ..experiments.critical import SETTINGS

    if setting not in SETTINGS:
        return None
    run = dict(SETTINGS[setting], **({} if steps is None else {"steps": steps}), name=setting)
    return json.loads(json.dumps(run))


def run_flat(plan, out: str | Path) -> list[dict]:
    """Every setting of ``plan.flat`` (a ``FlatPlan``), in order; writes ``flat.json`` and
    ``flat.md`` under ``out``."""
    out = Path(out)
    flat = plan.flat
    results = [critical_job(s, flat.seed, str(out / "settings")) for s in flat.settings]
    out.mkdir(parents=True, exist_ok=True)
    (out / "flat.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "flat.md").write_text(flat_markdown(results))
    return results


# ---- the page ----------------------------------------------------------------------------------
_LEVELS = {"compact": "the compact subgroup's (λ > 0)", "all": "the whole orbits (λ = 0)"}
_MODELS = {"transformer": "Transformer", "relational": "RelationalTransformer"}
_REDUCTIONS = {
    "heads": "GL(r) per head",
    "joint": "O(d) jointly with GL(r) per head",
    "declared": "declared: O(k) channels, GL(r) per head, O(D) gauge (joint)",
    "no-channels": "control: O(D) gauge and GL(r) per head, no channels",
}


def _describe(s: dict) -> str:
    model = _MODELS.get(s.get("model"), s.get("model"))
    if s.get("task") == "modadd":
        task = f"modadd p = {s['p']} ({s['frac_train']:.0%} of the pairs for training)"
    else:
        task = (
            f"teacher regression ({s.get('n_train')} training, {s.get('n_val')} validation "
            f"sequences of {s.get('seq_len')} tokens, vocabulary {s.get('vocab')})"
        )
    sizes = ", ".join(
        f"{k} {s[k]}"
        for k in (
            "d_model",
            "n_channels",
            "d_gauge",
            "n_heads",
            "d_head",
            "d_mlp",
            "d_mlp_channels",
        )
        if k in s
    )
    if s.get("tie_embeddings"):
        sizes += ", tied embeddings"
    if not s.get("steps"):
        how = f"the student starts at the teacher plus N(0, {s.get('start_noise'):g}²) noise, "
        how += "untrained, then Newton"
        if s.get("weight_decay"):
            how = "the teacher balanced and its targets shifted to make it critical; " + how
    else:
        how = f"{s.get('steps')} full-batch Adam steps at lr {s.get('lr'):g} (cosine), then "
        how += "L-BFGS and Newton"
    return f"{task}, {model} ({sizes}), λ = {s.get('weight_decay'):g}, {how}"


def _metric(r: dict) -> str:
    for key, label in (("val_accuracy", "val accuracy"), ("val_r2", "val R²")):
        if key in r:
            return f"{label} {r[key]:.3f}"
    return "—"


def _table(r: dict) -> list[str]:
    counts = r["counts"]
    tolerances = sorted(
        {t for c in counts.values() for t in c["flat_by_tolerance"]}, key=float, reverse=True
    )
    lines = [
        "| reduction | orbit dim | compact | expected flat | flat total | flat horizontal | "
        "at the widest gap (ratio) | " + " | ".join(f"{t}" for t in tolerances) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(tolerances),
    ]
    for name, c in counts.items():
        ladder = " | ".join(
            "{}/{}".format(*c["flat_by_tolerance"][t]) if t in c["flat_by_tolerance"] else "—"
            for t in tolerances
        )
        lines.append(
            f"| {_REDUCTIONS.get(name, name)} | {c['orbit_dim']} | {c['compact_orbit_dim']} "
            f"| {c['expected_flat']} | {c['flat_total']} | {c['flat_horizontal']} "
            f"| {_gap_cell(c.get('by_gap'))} | {ladder} |"
        )
    return lines


def _gap_cell(gap: dict | None) -> str:
    if not gap:
        return "—"  # counted before the gap rule existed
    return f"{gap['flat_total']}/{gap['flat_horizontal']} ({gap['ratio']:.0e})"


def flat_markdown(flat_results: list[dict]) -> str:
    """The "Flat directions" section: per setting ‖∇F‖ reached, the validation metric, the orbit
    dimensions, ``flat_total`` / ``flat_horizontal`` and the counts at each tolerance, and what
    the paper claims beside what was measured."""
    lines = ["## Flat directions", "", PAPER, ""]
    measured = []
    for r in flat_results:
        s = r.get("setting", {})
        name = s.get("name", "?")
        lines.append(f"### {name}")
        lines.append("")
        if "error" in r:
            lines += [f"Failed: {r['error']}", ""]
            continue
        refine = r["refine"]
        lines += [
            _describe(s) + ".",
            "",
            f"{r['n_params']:,} parameters; {_metric(r)} at the counted point "
            f"({_metric(r['trained'])} after training); ‖∇F‖ {r['trained']['grad_norm']:.1e} "
            f"after training, {refine['grad_norm']:.1e} after {refine['steps']} Newton steps "
            f"(relative ‖∇F‖/(max|λ(H)|·‖θ‖) = {refine['grad_rel']:.1e}, "
            f"{'converged' if refine['converged'] else 'not converged'}). "
            f"Level orbits: {_LEVELS[r['level']]}.",
            "",
        ]
        rule = next(iter(r["counts"].values()))["tolerance_rule"]
        if rule is None:  # the matrix-free route: residuals, no counts
            lines += [_uncounted_line(r), ""]
            continue
        lines += _table(r)
        lines += [
            "",
            f"Columns by tolerance: flat total / flat horizontal at |λ| ≤ tol·max|λ|; "
            f"the main columns use {rule}. The gap column counts below the widest "
            "gap of log|λ| under 1e-4·max|λ|, with the ratio across it.",
            "",
        ]
        for red, c in r["counts"].items():
            measured.append((name, red, c, refine["converged"]))
    lines += ["### Claim and measurement", "", _verdict(measured), ""]
    return "\n".join(lines)


def _uncounted_line(r: dict) -> str:
    """A setting refined matrix-free (above the dense size): what was certified instead."""
    parts = [
        f"{_REDUCTIONS.get(name, name)}: {c['expected_flat']} level directions, largest "
        f"‖Hv‖/(max|λ|·‖v‖) {c['max_level_residual']:.1e}"
        for name, c in r["counts"].items()
    ]
    return (
        "Above the dense size: refined matrix-free and not counted (the bottom of the spectrum "
        "is not resolved by Hessian–vector products at this conditioning); "
        + "; ".join(parts)
        + "."
    )


def _clean_counts(c: dict) -> tuple[int, int, str]:
    """The counts the verdict quotes: at the widest spectral gap when it is clean (ratio ≥ 1e3)
    and differs from the fixed tolerance's, else at the fixed tolerance."""
    gap = c.get("by_gap")
    fixed = (c["flat_total"], c["flat_horizontal"])
    if gap and gap["ratio"] >= 1e3 and (gap["flat_total"], gap["flat_horizontal"]) != fixed:
        return (
            gap["flat_total"],
            gap["flat_horizontal"],
            f" (at the widest gap, ×{gap['ratio']:.0e})",
        )
    return (*fixed, "")


def _verdict(measured) -> str:
    """What the counts say, setting by setting, without claiming more than was reached."""
    if not measured:
        return "Nothing was measured."
    exact, extra, open_ = [], [], []
    for name, red, c, converged in measured:
        total, horizontal, where = _clean_counts(c)
        text = (
            f"{name} ({red}): flat_total {total} against {c['expected_flat']} "
            f"expected, flat_horizontal {horizontal}{where}"
        )
        if not converged:
            open_.append(text + " (not converged)")
        elif total == c["expected_flat"] and horizontal == 0:
            exact.append(text)
        else:
            extra.append(text)
    out = []
    if exact:
        out.append(
            "At the critical points reached (‖∇F‖ at round-off) the counts are exact — "
            + "; ".join(exact)
            + ": every flat direction is an orbit direction of the declared group and none is "
            "left on the horizontal space, as the paper claims."
        )
    if extra:
        out.append(
            "At critical points too, these reductions leave flat horizontal directions — "
            + "; ".join(extra)
            + ": symmetries of the loss that the reduction does not quotient out (the controls "
            "by design; for a declared group, symmetries the model does not declare)."
        )
    if open_:
        out.append(
            "Elsewhere the refinement did not reach a critical point in its step budget, so the "
            "counts measure the tolerance, not the geometry (vertical curvature is O(‖∇F‖)): "
            + "; ".join(open_)
            + ". They neither confirm nor refute the claim."
        )
    return " ".join(out)


# ---- the earlier, unrefined experiment (still run by the study runner) -------------------------
def flat_job(size: str, steps: int, lr: float, weight_decay: float, seed: int, directory: str):
    """The report of ``model_flat_directions`` (plus training settings), cached as JSON."""
    path = Path(directory) / "flat.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        report = _train_and_analyse(size, steps, lr, weight_decay, seed)
    except Exception as err:  # noqa: BLE001 - reported on the page, not fatal to the study
        return dict(error=f"{type(err).__name__}: {' '.join(str(err).split())}")
    training.prepare_out(directory)
    training.write_json(path, report)
    return report


def _train_and_analyse(size, steps, lr, weight_decay, seed) -> dict:
    torch.manual_seed(seed)
    task = training.build_task("modadd", size, seed)
    model = training.build_model(task, "transformer", size).double()
    x, y = task.batch("train", None)
    params = [p for p in model.parameters() if p.requires_grad]

    def objective():
        penalty = sum(p.square().sum() for p in params)
        return task.loss(task.logits(model, x), y) + 0.5 * weight_decay * penalty

    adam = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, steps)
    for _ in range(steps):
        adam.zero_grad(set_to_none=True)
        objective().backward()
        adam.step()
        schedule.step()
    accuracy = task.evaluate(model, "val")["accuracy"]
    report = model_flat_directions(task, model, weight_decay=weight_decay)
    settings = dict(size=size, adam_steps=steps, lr=lr, seed=seed, val_accuracy=accuracy)
    return dict(settings, **report)


def main(argv=None) -> int:
    from .protocol import PLANS

    parser = argparse.ArgumentParser(prog="python -m quotopt.lab.study.flat", description=__doc__)
    parser.add_argument("--plan", choices=sorted(PLANS), default="standard")
    parser.add_argument("--out", required=True, help="directory for flat.json and flat.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run_flat(PLANS[args.plan], args.out)
    failed = [r["setting"].get("name") for r in results if "error" in r]
    sys.stdout.write(f"wrote {Path(args.out) / 'flat.json'}; failed: {failed or 'none'}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
