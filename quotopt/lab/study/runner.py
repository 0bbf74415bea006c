"""Run many independent jobs on a process pool, one torch thread per worker, reusing finished
runs on ``resume``. A failed run (an exception, a non-finite step) is recorded, not fatal: the
study reports it as diverged.

Workers die with the process that started them: on Linux the kernel kills a worker when its
parent dies (``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog thread in each worker exits
it once its parent is gone. When the block is left by an exception (Ctrl-C, a terminating
signal, a failure) running jobs get ``GRACE_SECONDS`` to save at their next step boundary,
then every worker is killed; each run directory has one writer at a time
(``training.run_lock``)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import training

#: seconds a running job has to save its checkpoint after an interrupt, before it is killed
GRACE_SECONDS = 20.0
#: seconds between a worker's checks that its parent is alive
WATCH_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
#: in a worker: whether a job is running, and whether an interrupt came (then every later job
#: returns at once, so that a stopping pool is not kept waiting by queued ones)
_WORKER = {"busy": False, "stopped": False}
_INTERRUPTED = {"error": "interrupted", "interrupted": True}


def run_dir(root: Path, cfg: training.RunConfig) -> Path:
    """``root/TASK/MODEL[-VARIANT]-OPTIM/lrLR-wdWD-seedS[-gaugeK[-roundtrip]]`` of a resolved
    config."""
    name = f"lr{cfg.lr:g}-wd{cfg.weight_decay:g}-seed{cfg.seed}"
    if cfg.gauge_condition is not None:
        name += f"-gauge{cfg.gauge_condition:g}" + ("-roundtrip" if cfg.gauge_round_trip else "")
    model = cfg.model if cfg.variant is None else f"{cfg.model}-{cfg.variant}"
    return Path(root) / cfg.task / f"{model}-{cfg.optim}" / name


def train_job(cfg: training.RunConfig, directory: str, resume: bool) -> dict:
    """``{"summary", "records"}`` of one training run, or ``{"error": message}``; the run
    directory is held (``training.run_lock``) from the check for a finished run to the
    removal of the finished run's checkpoint."""
    directory = Path(directory)
    try:
        with training.run_lock(training.prepare_out(directory)):
            summary = training.finished_summary(cfg, directory) if resume else None
            if summary is None:
                again = resume and (directory / "checkpoint.pt").is_file()
                summary = training.train(cfg, directory, resume=again)
                (directory / "checkpoint.pt").unlink(missing_ok=True)  # the summary suffices
            return dict(summary=summary, records=training.read_records(directory))
    except KeyboardInterrupt:
        return dict(_INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the study
        message = " ".join(str(err).split()) or type(err).__name__
        return dict(error=f"{type(err).__name__}: {message}")


def call(fn: Callable[..., dict], args: Sequence) -> dict:
    """``fn(*args)``: lets one ``Pool.map`` run jobs of several kinds."""
    return fn(*args)


def _init_worker(parent: int) -> None:
    torch.set_num_threads(1)  # small models: one thread per process beats shared threads
    signal.signal(signal.SIGINT, _on_interrupt)  # whatever the parent's main module installed
    die_with_parent(parent)


def _on_interrupt(signum, frame) -> None:
    _WORKER["stopped"] = True
    if _WORKER["busy"]:
        raise KeyboardInterrupt


def _guarded(fn: Callable[..., dict], *args) -> dict:
    """``fn(*args)`` in a worker, or the interrupted result once an interrupt came."""
    if _WORKER["stopped"]:
        return dict(_INTERRUPTED)
    _WORKER["busy"] = True
    try:
        result = fn(*args)
    except KeyboardInterrupt:
        result = dict(_INTERRUPTED)
    finally:
        _WORKER["busy"] = False
    _WORKER["stopped"] |= bool(result.get("interrupted"))
    return result


def die_with_parent(parent: int) -> None:
    """End this process when the process ``parent`` (its parent now) ends, however it ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="quotopt-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(WATCH_SECONDS)
    os._exit(1)


class Pool:
    """``map(fn, jobs)`` over ``workers`` spawned processes (0: in this process); ``on_done``
    runs in this process after each job. Use it as a context manager: the worker processes
    start once and serve every ``map`` inside the block."""

    def __init__(self, workers: int = 0, on_done: Callable[[dict], None] | None = None):
        self.workers, self.on_done, self._executor = workers, on_done, None

    def __enter__(self) -> Pool:
        if self.workers > 0:
            context = multiprocessing.get_context("spawn")
            self._executor = cf.ProcessPoolExecutor(
                self.workers, context, initializer=_init_worker, initargs=(os.getpid(),)
            )
        self._running: set[cf.Future] = set()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if kind is None:
            executor.shutdown(wait=True)
            return
        # stopped: queued jobs are dropped; running ones may save (they got the interrupt
        # too: the terminal's, or the one the command forwards), then every worker ends
        workers = multiprocessing.active_children()
        started = [f for f in self._running if not f.cancel()]  # a queued job never starts
        executor.shutdown(wait=False, cancel_futures=True)
        cf.wait(started, timeout=GRACE_SECONDS)
        for process in workers:
            process.kill()
        for process in workers:
            process.join()
        executor.shutdown(wait=True)

    def map(self, fn: Callable[..., dict], jobs: Sequence[tuple]) -> list[dict]:
        results: list[dict | None] = [None] * len(jobs)
        if self._executor is None:
            if self.workers > 0:
                raise RuntimeError("use the Pool as a context manager: with Pool(n) as pool")
            for i, job in enumerate(jobs):
                results[i] = self._done(fn(*job))
            return results
        futures = {self._executor.submit(_guarded, fn, *job): i for i, job in enumerate(jobs)}
        self._running = set(futures)
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
