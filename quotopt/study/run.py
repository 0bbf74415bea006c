"""Run a ``StudyPlan``: tune every optimiser on every task, rerun each at its best setting on
every seed, compare the relational model with the standard one, count flat directions.

Returns the results as one JSON-ready dict (also written to ``OUT/study.json``)."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from .. import training
from .flat import flat_job
from .protocol import StudyPlan, TaskPlan, score
from .runner import Pool, run_dir, train_job


def _config(t: TaskPlan, optim: str, lr: float, wd: float, seed: int) -> training.RunConfig:
    # fmt: off
    return training.RunConfig(
        task=t.task, size=t.size, optim=optim, steps=t.steps, seed=seed, lr=lr, weight_decay=wd,
        eval_every=t.eval_every, stop_at_target=t.stop_at_target,
    ).resolved()
    # fmt: on


def _jobs(configs, root: Path, resume: bool) -> list[tuple]:
    return [(cfg, str(run_dir(root, cfg)), resume) for cfg in configs]


def _best(t: TaskPlan, optim: str, tuned: list[dict]) -> tuple[float, float]:
    """The (lr, wd) of the best-scoring tuning run; ties go to the first in grid order."""
    settings = t.grid(optim).settings()
    scores = [score(r.get("summary"), t.criterion) for r in tuned]
    return settings[min(range(len(settings)), key=lambda i: scores[i])]


def run_study(plan: StudyPlan, out, *, workers: int = 1, resume: bool = False, on_done=None):
    """Run ``plan`` with runs under ``OUT/runs``; ``on_done(result)`` after every run."""
    out = training.prepare_out(out)
    started = time.perf_counter()
    with Pool(workers, on_done) as pool:
        results = _run_phases(plan, out, pool, resume)
    machine = dict(
        cpu=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    # fmt: off
    return dict(plan=plan.name, wall_time=time.perf_counter() - started, workers=workers,
                machine=machine, **results)
    # fmt: on


def _run_phases(plan: StudyPlan, out: Path, pool: Pool, resume: bool) -> dict:
    root = out / "runs"
    # phase 1: every optimiser's grid on the tuning seed, and the flat-direction runs
    tuning = [
        (t, optim, _config(t, optim, lr, wd, t.tune_seed))
        for t in plan.tasks
        for optim in t.optims
        for lr, wd in t.grid(optim).settings()
    ]
    f = plan.flat
    flat_jobs = [
        (f.size, f.steps, f.lr, wd, f.seed, str(out / "flat" / f"wd{wd:g}"))
        for wd in f.weight_decays
    ]
    tuned = pool.map(train_job, _jobs([c for *_, c in tuning], root, resume))
    flat = pool.map(flat_job, flat_jobs)

    tasks = {}
    for t in plan.tasks:
        entry = tasks.setdefault(t.task, dict(plan=dataclasses.asdict(t), tuning={}, best={}))
        for optim in t.optims:
            runs = [r for (tp, o, _), r in zip(tuning, tuned) if tp is t and o == optim]
            grid = t.grid(optim).settings()
            entry["tuning"][optim] = [
                dict(lr=lr, weight_decay=wd, summary=r.get("summary"), error=r.get("error"))
                for (lr, wd), r in zip(grid, runs)
            ]
            entry["best"][optim] = _best(t, optim, runs)

    # phase 2: the other seeds at each optimiser's best setting; the relational comparison
    seeded = [
        (t, optim, _config(t, optim, *tasks[t.task]["best"][optim], seed))
        for t in plan.tasks
        for optim in t.optims
        for seed in t.seeds
    ]
    rp = plan.relational
    lr, wd = tasks[rp.task]["best"]["adamw"] if rp.task in tasks else (None, None)
    relational = [
        # fmt: off
        training.RunConfig(
            task=rp.task,
            size=rp.size,
            model=model,
            optim="adamw",
            lr=lr,
            weight_decay=wd,
            steps=rp.steps,
            seed=seed,
            eval_every=rp.eval_every,
        ).resolved()
        # fmt: on
        for model in training.MODELS
        for seed in rp.seeds
    ]
    # the tuning seed's run is reused (same directory: resume=True picks it up)
    jobs = _jobs([c for *_, c in seeded], root, True)
    done = pool.map(train_job, jobs + _jobs(relational, out / "relational", resume))
    final, rel = done[: len(jobs)], done[len(jobs) :]

    for (t, optim, _), r in zip(seeded, final):
        tasks[t.task].setdefault("runs", {}).setdefault(optim, []).append(r)
    models = {m: [r for c, r in zip(relational, rel) if c.model == m] for m in training.MODELS}
    return dict(
        tasks=tasks,
        relational=dict(plan=dataclasses.asdict(rp), lr=lr, weight_decay=wd, runs=models),
        flat=flat,
    )
