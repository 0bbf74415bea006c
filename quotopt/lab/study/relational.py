"""The study's relational phase (``RelationalPlan``): the standard model against the relational
model at equal parameters, and a sweep of relational variants at equal training FLOPs.

The standard runs are the task's own AdamW runs at its tuned setting when the settings match
(same directory, reused); every relational run uses the same rate, schedule, batches and
evaluation cadence. The sweep picks its best variant by final validation loss on the tuning
seed (all variants spent the same FLOPs), retunes its rate over ``lr_factors``, and reruns it —
and its dressed twin — on every seed. Then the best variant is trained on every seed for the
standard run's *time*: its steps are the standard steps × the ratio of the two models' ms/step
measured side by side, with the whole schedule fitted into them (reading a FLOPs-budget run
part-way through its cosine schedule would compare an unannealed model). The step budget is
saved with the timing it came from (``equal-time.json``) and reused on resume, so that a
re-measured timing does not start new runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ...models.flops import training_flops_per_token
from .. import training
from .protocol import StudyPlan
from .runner import Pool, call, run_dir, train_job
from .summaries import equal_time_steps
from .timing import timing_job
from .tuning import best_setting


def _flops(task, model: str, size: str, variant: str | None) -> float:
    with torch.device("meta"):
        net = training.build_model(task, model, size, variant)
    return training_flops_per_token(net, task.seq_len)


def _jobs(configs, root: Path, resume: bool) -> list[tuple]:
    return [(cfg, str(run_dir(root, cfg)), resume) for cfg in configs]


def run_relational(
    plan: StudyPlan, tasks: dict, known: list, root: Path, out: Path, pool: Pool, resume
):
    """The relational phase's results: ``runs`` (transformer / relational at equal parameters),
    and with variants ``sweep``, ``best`` (variant, lr), ``seeds`` and ``dressed``. ``known``:
    the configs of the runs under ``root`` (a standard run among them is reused)."""
    rp = plan.relational
    lr, wd = tasks[rp.task]["best"]["adamw"] if rp.task in tasks else (None, None)
    schedule = next((t.schedule for t in plan.tasks if t.task == rp.task), "constant")

    base = training.RunConfig(
        task=rp.task,
        size=rp.size,
        optim="adamw",
        lr=lr,
        weight_decay=wd,
        steps=rp.steps,
        eval_every=rp.eval_every,
        schedule=schedule,
    )

    cfg = lambda **kw: dataclasses.replace(base, **kw).resolved()  # noqa: E731
    rel_root = out / "relational"
    standard = [cfg(model="transformer", seed=s) for s in rp.seeds]
    equal = rp.seeds if rp.equal_param_seeds is None else rp.equal_param_seeds
    equal_params = [cfg(model="relational", seed=s) for s in equal]
    task = training.build_task(rp.task, rp.size)
    reference = _flops(task, "transformer", rp.size, None)
    steps = {
        v: round(rp.steps * reference / _flops(task, "relational", rp.size, v)) for v in rp.variants
    }
    tune = rp.seeds[0]
    sweep = [cfg(model="relational", variant=v, steps=steps[v], seed=tune) for v in rp.variants]
    # the standard runs: the task's AdamW runs when identical (same directory), else here
    own = [
        (c, str(run_dir(root if c in known else rel_root, c)), c in known or resume)
        for c in standard
    ]
    done = pool.map(train_job, own + _jobs(equal_params + sweep, rel_root, resume))
    n = len(standard) + len(equal_params)
    result = dict(
        plan=dataclasses.asdict(rp),
        lr=lr,
        weight_decay=wd,
        runs=dict(transformer=done[: len(standard)], relational=done[len(standard) : n]),
        reference_flops=reference,
    )
    if not rp.variants:
        return result
    swept = done[n:]
    result["sweep"] = [
        dict(variant=v, steps=steps[v], flops=_flops(task, "relational", rp.size, v), **r)
        for v, r in zip(rp.variants, swept)
    ]
    names = list(rp.variants)
    variant = best_setting(names, [r.get("summary") for r in swept], "loss")
    # retune the best variant's rate around the standard model's
    first = swept[names.index(variant)]
    retune = [
        cfg(model="relational", variant=variant, steps=steps[variant], seed=tune, lr=lr * f)
        for f in rp.lr_factors
    ]
    contenders = [("transformer", None), ("relational", None)] + [("relational", v) for v in names]
    timing = (rp.task, rp.size, [(m, v, "adamw", lr, wd) for m, v in contenders])
    *retuned, timed = pool.map(
        call, [(train_job, j) for j in _jobs(retune, rel_root, resume)] + [(timing_job, timing)]
    )
    if "ms_per_step" in timed:
        result["timing"] = dict(zip(["transformer", "equal_params", *names], timed["ms_per_step"]))
    rates = [lr] + [c.lr for c in retune]
    best_lr = best_setting(rates, [r.get("summary") for r in [first, *retuned]], "loss")
    result["lr_tuning"] = [dict(lr=rate, **r) for rate, r in zip(rates, [first, *retuned])]
    names_by_seed = [variant] + ([f"{variant}-dressed"] if rp.dressed else [])
    final = [
        cfg(model="relational", variant=v, steps=steps[variant], seed=s, lr=best_lr)
        for v in names_by_seed
        for s in rp.seeds
    ]
    runs = pool.map(train_job, _jobs(final, rel_root, True))  # the tuning seed's run is reused
    k = len(rp.seeds)
    result.update(best=dict(variant=variant, lr=best_lr, steps=steps[variant]), seeds=runs[:k])
    if rp.dressed:
        result["dressed"] = runs[k:]
    budget = _equal_time_budget(result, variant, rp.steps, rel_root / "equal-time.json", resume)
    if budget is not None:
        timed = [
            cfg(model="relational", variant=variant, steps=budget["steps"], seed=s, lr=best_lr)
            for s in rp.seeds
        ]
        equal_root = rel_root / "equal-time"
        result["equal_time"] = dict(
            budget, runs=pool.map(train_job, _jobs(timed, equal_root, resume))
        )
    return result


def _equal_time_budget(result: dict, variant: str, steps: int, path: Path, resume) -> dict | None:
    """``{"variant", "steps", "ms_transformer", "ms_variant"}``: the steps of ``variant`` that
    take the standard run's time (side-by-side ms/step), saved at ``path`` and reused from it
    on resume; None without a timing."""
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("variant") == variant and saved.get("standard_steps") == steps:
            return saved
    timing = result.get("timing") or {}
    if "transformer" not in timing or variant not in timing:
        return None
    budget = dict(
        variant=variant,
        standard_steps=steps,
        steps=max(1, round(equal_time_steps(steps, timing, variant))),
        ms_transformer=timing["transformer"],
        ms_variant=timing[variant],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(budget, indent=1) + "\n")
    return budget
