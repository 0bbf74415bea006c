"""Run a ``StudyPlan``: tune every optimiser on every task (growing each grid until it brackets
its best setting, where the plan allows), rerun each at its best setting on every seed and from
gauge-transformed starts, compare the relational model with the standard one, count flat
directions.

Returns the results as one JSON-ready dict (also written to ``OUT/study.json``)."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from .. import training
from .flat import critical_job, flat_job
from .protocol import StudyPlan, TaskPlan
from .relational import run_relational
from .runner import Pool, call, run_dir, train_job
from .timing import timing_job
from .tuning import best_setting, extend


def _config(t: TaskPlan, optim: str, lr: float, wd: float, seed: int, gauge=None, trip=False):

    return training.RunConfig(
        task=t.task,
        size=t.size,
        optim=optim,
        steps=t.steps,
        seed=seed,
        lr=lr,
        weight_decay=wd,
        eval_every=t.eval_every,
        stop_at_target=t.stop_at_target,
        schedule=t.schedule,
        gauge_condition=gauge,
        gauge_round_trip=trip,
    ).resolved()


def _starts(kappas: tuple[float, ...]) -> list[tuple[float, bool]]:
    """(κ, round trip) of the gauge-transformed starts: every κ, then the round trip at the
    largest."""
    return [(k, False) for k in kappas] + ([(max(kappas), True)] if kappas else [])


def _jobs(configs, root: Path, resume: bool) -> list[tuple]:
    return [(cfg, str(run_dir(root, cfg)), resume) for cfg in configs]


def run_study(plan: StudyPlan, out, *, workers=1, resume=False, on_done=None, on_planned=None):
    """Run ``plan`` with runs under ``OUT/runs``; ``on_done(result)`` after every run,
    ``on_planned(n)`` when bracketing adds ``n`` runs to the plan."""
    out = training.prepare_out(out)
    started = time.perf_counter()
    with Pool(workers, on_done) as pool:
        results = _run_phases(plan, out, pool, resume, on_planned or (lambda n: None))
    machine = dict(
        cpu=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
    )

    return dict(
        plan=plan.name,
        wall_time=time.perf_counter() - started,
        workers=workers,
        machine=machine,
        **results,
    )


def _tune(plan: StudyPlan, root: Path, pool: Pool, resume: bool, on_planned, before) -> dict:
    """Phase 1: every optimiser's grid on the tuning seed (``before()`` is mapped alongside the
    first round), then rounds of bracketing until no best sits on an extendable edge."""
    keys = [(t, optim) for t in plan.tasks for optim in t.optims]
    settings = {k: list(k[0].grid(k[1]).settings()) for k in keys}
    runs = {k: [] for k in keys}
    used = {k: {} for k in keys}
    pending, first = {k: list(settings[k]) for k in keys}, True
    while pending:
        batch = [(k, lr, wd) for k, new in pending.items() for lr, wd in new]
        configs = [_config(t, o, lr, wd, t.tune_seed) for (t, o), lr, wd in batch]
        done = pool.map(train_job, _jobs(configs, root, resume))
        if first:
            extra, first = before(), False
        for (k, *_), r in zip(batch, done):
            runs[k].append(r)
        pending = {}
        for k in keys:
            t, optim = k
            summaries = [r.get("summary") for r in runs[k]]
            new = extend(t.grid(optim), settings[k], summaries, t.criterion, t.extensions, used[k])
            if new:
                settings[k] += new
                pending[k] = new
        if pending:
            on_planned(sum(len(v) for v in pending.values()))

    tasks = {}
    for t, optim in keys:
        entry = tasks.setdefault(t.task, dict(plan=dataclasses.asdict(t), tuning={}, best={}))
        k = (t, optim)
        entry["tuning"][optim] = [
            dict(lr=lr, weight_decay=wd, summary=r.get("summary"), error=r.get("error"))
            for (lr, wd), r in zip(settings[k], runs[k])
        ]
        best = best_setting(settings[k], [r.get("summary") for r in runs[k]], t.criterion)
        entry["best"][optim] = best
    return dict(tasks=tasks, before=extra)


def _run_phases(plan: StudyPlan, out: Path, pool: Pool, resume: bool, on_planned) -> dict:
    root = out / "runs"
    f = plan.flat
    flat_jobs = [
        (f.size, f.steps, f.lr, wd, f.seed, str(out / "flat" / f"wd{wd:g}"))
        for wd in f.weight_decays
    ]
    critical = [(s, f.seed, str(out / "flat" / "settings")) for s in f.settings]
    jobs = [(flat_job, j) for j in flat_jobs] + [(critical_job, j) for j in critical]
    tuned = _tune(plan, root, pool, resume, on_planned, lambda: pool.map(call, jobs))
    tasks, flat = tuned["tasks"], tuned["before"][: len(flat_jobs)]
    critical = tuned["before"][len(flat_jobs) :]

    # phase 2: the other seeds and the gauge-transformed starts at each optimiser's best
    # setting; then the relational phase
    seeded = [
        (t, optim, _config(t, optim, *tasks[t.task]["best"][optim], seed))
        for t in plan.tasks
        for optim in t.optims
        for seed in t.seeds
    ]
    # the gauge-transformed starts, and the round trip g then g⁻¹ at the largest κ: the
    # spread that the transformations' round-off alone leaves (the floor of the spread)
    gauged = [
        (t, optim, _config(t, optim, *tasks[t.task]["best"][optim], t.tune_seed, kappa, trip))
        for t in plan.tasks
        for optim in t.optims
        for kappa, trip in _starts(t.gauge_starts(optim))
    ]
    # the tuning seed's run is reused (same directory: resume=True picks it up)
    jobs = _jobs([c for *_, c in seeded], root, True)
    gauge_jobs = _jobs([c for *_, c in gauged], root, resume)
    done = pool.map(train_job, jobs + gauge_jobs)
    final, gauge_runs = done[: len(jobs)], done[len(jobs) :]
    for (t, optim, _), r in zip(seeded, final):
        tasks[t.task].setdefault("runs", {}).setdefault(optim, []).append(r)
    for (t, optim, cfg), r in zip(gauged, gauge_runs):
        r = dict(r, gauge_condition=cfg.gauge_condition)
        key = "gauge_round_trip" if cfg.gauge_round_trip else "gauge"
        tasks[t.task].setdefault(key, {}).setdefault(optim, []).append(r)
    # time per step of every optimiser at its best setting, side by side in one process
    timing_jobs = [
        (t.task, t.size, [("transformer", None, o, *tasks[t.task]["best"][o]) for o in t.optims])
        for t in plan.tasks
    ]
    for t, timed in zip(plan.tasks, pool.map(timing_job, timing_jobs)):
        if "ms_per_step" in timed:
            tasks[t.task]["timing"] = dict(zip(t.optims, timed["ms_per_step"]))
        else:
            tasks[t.task]["timing_error"] = timed["error"]
    known = [c for *_, c in seeded]
    relational = run_relational(plan, tasks, known, root, out, pool, resume)
    return dict(tasks=tasks, relational=relational, flat=flat, critical=critical)
