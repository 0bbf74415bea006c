"""Time per training step measured side by side: the study's runs log their own step times,
but runs that ran at different moments of a shared machine do not compare. Here every
contender of one comparison is built in one process and stepped in interleaved rounds (each
round visits the contenders in a rotated order) on the same pre-drawn batches; the figure is
the median over rounds of the mean step time within a round.

A contender is ``(model, variant, optim, lr, wd)``; a job is ``(task, size, contenders)``.
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import training
from ..training.loop import train_step

WARMUP, ROUNDS, STEPS_PER_ROUND = 5, 7, 10


def timing_job(task_name: str, size: str, contenders: list[tuple], rounds: int = ROUNDS) -> dict:
    """``{"ms_per_step": [one per contender], "threads": n}``, or ``{"error": message}``."""
    try:
        return _time(task_name, size, contenders, rounds)
    except Exception as err:  # noqa: BLE001 - reported on the page, not fatal to the study
        return dict(error=f"{type(err).__name__}: {' '.join(str(err).split())}")


def _time(task_name, size, contenders, rounds) -> dict:
    task = training.build_task(task_name, size)
    defaults = training.TASK_DEFAULTS[task_name]
    gen = torch.Generator().manual_seed(0)
    n = WARMUP + rounds * STEPS_PER_ROUND
    batches = [task.batch("train", defaults["batch_size"] or None, generator=gen) for _ in range(n)]
    built = []
    for model_name, variant, optim, lr, wd in contenders:
        torch.manual_seed(0)
        model = training.build_model(task, model_name, size, variant)
        opt = training.build_optimizer(optim, model, lr, wd, defaults["betas"], task_name)
        built.append((model, opt))
    for model, opt in built:
        for x, y in batches[:WARMUP]:
            train_step(model, opt, task, x, y)
    times = [[] for _ in built]
    for r in range(rounds):
        chunk = batches[WARMUP + r * STEPS_PER_ROUND : WARMUP + (r + 1) * STEPS_PER_ROUND]
        for i in [(r + j) % len(built) for j in range(len(built))]:
            model, opt = built[i]
            tic = time.perf_counter()
            for x, y in chunk:
                train_step(model, opt, task, x, y)
            times[i].append(1e3 * (time.perf_counter() - tic) / len(chunk))
    return dict(ms_per_step=[statistics.median(t) for t in times], threads=torch.get_num_threads())
