"""Run many independent jobs on a process pool, one torch thread per worker, reusing finished
runs on ``resume``. A failed run (an exception, a non-finite step) is recorded, not fatal: the
study reports it as diverged."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import training


def run_dir(root: Path, cfg: training.RunConfig) -> Path:
    """``root/TASK/MODEL[-VARIANT]-OPTIM/lrLR-wdWD-seedS[-gaugeK[-roundtrip]]`` of a resolved
    config."""
    name = f"lr{cfg.lr:g}-wd{cfg.weight_decay:g}-seed{cfg.seed}"
    if cfg.gauge_condition is not None:
        name += f"-gauge{cfg.gauge_condition:g}" + ("-roundtrip" if cfg.gauge_round_trip else "")
    model = cfg.model if cfg.variant is None else f"{cfg.model}-{cfg.variant}"
    return Path(root) / cfg.task / f"{model}-{cfg.optim}" / name


def train_job(cfg: training.RunConfig, directory: str, resume: bool) -> dict:
    """``{"summary", "records"}`` of one training run, or ``{"error": message}``."""
    directory = Path(directory)
    summary = training.finished_summary(cfg, directory) if resume else None
    if summary is not None:
        return dict(summary=summary, records=training.read_records(directory))
    try:
        again = resume and (directory / "checkpoint.pt").is_file()
        summary = training.train(cfg, directory, resume=again)
    except KeyboardInterrupt:
        return dict(error="interrupted", interrupted=True)
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the study
        message = " ".join(str(err).split()) or type(err).__name__
        return dict(error=f"{type(err).__name__}: {message}")
    (directory / "checkpoint.pt").unlink(missing_ok=True)  # finished: the summary suffices
    return dict(summary=summary, records=training.read_records(directory))


def call(fn: Callable[..., dict], args: Sequence) -> dict:
    """``fn(*args)``: lets one ``Pool.map`` run jobs of several kinds."""
    return fn(*args)


def _init_worker() -> None:
    torch.set_num_threads(1)  # small models: one thread per process beats shared threads
    # subnormal floats (far-away ALiBi attention weights, tiny Adam moments) run ~100× slower
    # on x86 CPUs; flushing them changes results only below 1e-38
    torch.set_flush_denormal(True)


class Pool:
    """``map(fn, jobs)`` over ``workers`` spawned processes (0: in this process); ``on_done``
    runs in this process after each job. Use it as a context manager: the worker processes
    start once and serve every ``map`` inside the block."""

    def __init__(self, workers: int = 0, on_done: Callable[[dict], None] | None = None):
        self.workers, self.on_done, self._executor = workers, on_done, None

    def __enter__(self) -> Pool:
        if self.workers > 0:
            context = multiprocessing.get_context("spawn")
            self._executor = cf.ProcessPoolExecutor(self.workers, context, initializer=_init_worker)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._executor is not None:
            # after Ctrl-C or a failure, queued jobs are dropped, running ones finish
            self._executor.shutdown(wait=True, cancel_futures=kind is not None)
            self._executor = None

    def map(self, fn: Callable[..., dict], jobs: Sequence[tuple]) -> list[dict]:
        results: list[dict | None] = [None] * len(jobs)
        if self._executor is None:
            if self.workers > 0:
                raise RuntimeError("use the Pool as a context manager: with Pool(n) as pool")
            for i, job in enumerate(jobs):
                results[i] = self._done(fn(*job))
            return results
        futures = {self._executor.submit(fn, *job): i for i, job in enumerate(jobs)}
        for future in cf.as_completed(futures):
            results[futures[future]] = self._done(future.result())
        if any(r.get("interrupted") for r in results):
            raise KeyboardInterrupt
        return results

    def _done(self, result: dict) -> dict:
        if self.on_done is not None:
            self.on_done(result)
        return result


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
