"""The fine-tuning protocol: per rank, each optimiser tuned on seed 0, then every seed at its best.

Tuning (seed 0, score: final validation loss; a diverged run scores +∞):

1. the learning rate over ``lrs`` at the middle value of the optimiser's second hyperparameter
   grid (LoRA+'s ratio, the damping of ``qadam-inv`` / ``qsgd-inv``; none for the others);
   while the best lr is an edge of the grid, the grid grows by one point beyond that edge (the
   grid's own spacing), at most ``max_extend`` times per side — so the reported best is
   bracketed unless the report says otherwise;
2. at that lr, the other values of the second grid, grown past a best edge in the same way;
   if another value wins, the lr is bracketed again around it (its two neighbours, extended
   as in 1).

Then the runs of the other seeds at the best setting. Run directories are
``out/runs/r{rank}/{optim}/lr{lr}-{ratio|damping}{value}-seed{seed}`` (under
``out/runs/{task}/`` for a task other than ``stdlib``); ``resume`` reuses every finished run
(``run.finished``), and every run's summary records its time (``wall_time``, ``ms_per_step``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..training.optimizers import lookup_optimizer
from ..training.runs import read_records
from .run import FinetuneConfig, finetune, finished

__all__ = ["run_dir", "study", "tune"]


def run_dir(out, config: FinetuneConfig) -> Path:
    """The directory of one run under ``out`` (module docstring)."""
    field = lookup_optimizer(config.optim, "lora").secondary
    extra = f"-{field}{getattr(config, field):g}" if field else ""
    name = f"lr{config.lr:g}{extra}-seed{config.seed}"
    runs = Path(out) / "runs"
    if config.task != "stdlib":
        runs = runs / config.task
    return runs / f"r{config.rank}" / config.optim / name


def _score(summary: dict) -> float:
    value = summary.get("final_val_loss")
    return math.inf if value is None else value


class _Runner:
    """Runs (or reuses) configurations, remembering every summary."""

    def __init__(self, out, base, data, resume: bool, progress=None):
        self.out, self.base, self.data, self.resume = out, base, data, resume
        self.progress, self.done = progress, {}

    def __call__(self, config: FinetuneConfig) -> dict:
        key = run_dir(self.out, config)
        if key in self.done:
            return self.done[key]
        summary = finished(config, key) if self.resume else None
        on_step = None
        if self.progress is not None:
            on_step = self.progress.start(
                key.relative_to(Path(self.out) / "runs").as_posix(), config.steps
            )
        if summary is None:
            summary = finetune(config, key, self.base, self.data, on_step=on_step)
        if self.progress is not None:
            self.progress.finish(summary)
        self.done[key] = summary
        return summary


def _neighbour(grid: list[float], lr: float, side: int) -> float:
    """The next lr beyond ``lr`` on ``side`` (-1 smaller, +1 larger), at the grid's spacing."""
    factor = grid[1] / grid[0] if len(grid) > 1 else 3.0
    return lr * factor**side


def _bracket(run, config, grid: list[float], max_extend: int, field: str = "lr"):
    """Best value of ``field`` of ``config`` over ``grid``, growing the grid past a best edge;
    returns (best, the grid run)."""
    grid = sorted(grid)
    scores = {x: _score(run(dataclasses.replace(config, **{field: x}))) for x in grid}
    for side in (-1, 1):
        for _ in range(max_extend):
            best = min(scores, key=scores.get)
            edge = grid[0] if side < 0 else grid[-1]
            if best != edge:
                break
            x = float(f"{_neighbour(grid, edge, side):.3g}")
            scores[x] = _score(run(dataclasses.replace(config, **{field: x})))
            grid = sorted(scores)
    return min(scores, key=scores.get), grid


def tune(run, config: FinetuneConfig, lrs, seconds: dict, max_extend: int = 3) -> dict:
    """The best setting of ``config.optim`` at ``config.rank`` on ``config.seed`` (module
    docstring); ``seconds`` maps a hyperparameter field to its grid. Returns ``{"lr", field:
    value, "edge": whether the lr is still a grid edge, "{field}_edge": the same for the
    second hyperparameter}``."""
    field = lookup_optimizer(config.optim, "lora").secondary
    values = sorted(seconds.get(field, ())) if field else []
    if values:
        config = dataclasses.replace(config, **{field: values[len(values) // 2]})
    lr, grid = _bracket(run, config, list(lrs), max_extend)
    best = dataclasses.replace(config, lr=lr)
    setting: dict = {}
    if values:
        value, second = _bracket(run, best, values, max_extend, field)
        setting[f"{field}_edge"] = len(second) > 1 and value in (min(second), max(second))
        if value != getattr(best, field):
            moved = dataclasses.replace(best, **{field: value})
            around = [_neighbour(grid, lr, -1), lr, _neighbour(grid, lr, 1)]
            lr, grid = _bracket(run, moved, [float(f"{x:.3g}") for x in around], max_extend)
            best = dataclasses.replace(moved, lr=lr)
        setting[field] = getattr(best, field)
    return {"lr": best.lr, "edge": best.lr in (min(grid), max(grid)), **setting}


def study(
    out,
    base,
    data,
    template: FinetuneConfig,
    *,
    ranks,
    optims,
    lrs,
    seeds,
    seconds: dict,
    resume: bool = False,
    progress=None,
    max_extend: int = 3,
) -> dict:
    """``{rank: {optim: {"best", "tuning": [summary, ...], "runs": [{"summary", "records"}]}}}``:
    the protocol of the module docstring, every run under ``out``."""
    run = _Runner(out, base, data, resume, progress)
    results: dict = {}
    for rank in ranks:
        results[rank] = {}
        for optim in optims:
            first = len(run.done)
            config = dataclasses.replace(template, rank=rank, optim=optim, seed=seeds[0])
            setting = tune(run, config, lrs, seconds, max_extend)
            tuning = list(run.done.values())[first:]
            best = dataclasses.replace(
                config, **{k: v for k, v in setting.items() if not k.endswith("edge")}
            )
            runs = []
            for seed in seeds:
                seeded = dataclasses.replace(best, seed=seed)
                summary = run(seeded)
                runs.append(dict(summary=summary, records=read_records(run_dir(out, seeded))))
            results[rank][optim] = dict(best=setting, tuning=tuning, runs=runs)
    return results
