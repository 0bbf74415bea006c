"""``quotopt train``: one run of ``quotopt.lab.training.train`` with a progress bar."""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch

from .. import training
from ..tasks import TASKS
from ..training.schedule import SCHEDULES
from .args import (
    add_output_options,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed,
    thread_count,
)

#: ``--resume`` of a single run
RESUME = "continue from OUT/checkpoint.pt, bit-exact (same --threads)"


def add_common_arguments(
    parser, *, steps, task=None, size=None, threads=None, single=True, resume=RESUME
):
    """Options shared by ``train``, ``spectrum`` and (``single=False``: no --optim, --seed,
    --lr, --weight-decay) ``compare``; ``resume``: the help of ``--resume`` (None: no such
    option); the output options are ``args.add_output_options``."""
    sizes = ", ".join(f"{t} {next(iter(s))}" for t, s in training.SIZES.items())
    opt = parser.add_argument
    opt(
        "--task",
        choices=sorted(TASKS),
        required=task is None,
        default=task,
        help="benchmark task" + (f" (default: {task})" if task else ""),
    )
    opt(
        "--model",
        choices=training.MODELS,
        default="transformer",
        help="architecture (default: %(default)s)",
    )
    opt(
        "--steps",
        type=positive_int,
        default=steps,
        required=steps is None,
        help="total optimiser steps" + (f" (default: {steps})" if steps else ""),
    )
    opt(
        "--size",
        choices=sorted({s for t in training.SIZES.values() for s in t}),
        default=size,
        help=f"model size (default: {size or 'per task: ' + sizes})",
    )
    if single:
        _add_run_arguments(parser)
    opt(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="learning-rate schedule: constant, or cosine (nanoGPT's warm-up, then a cosine to "
        "a tenth) (default: constant)",
    )
    opt(
        "--batch-size",
        type=nonnegative_int,
        help="batch size, at most the training examples; 0 for full batch (default: per task)",
    )
    opt("--eval-every", type=positive_int, help="steps between evaluations (default: per task)")
    opt("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    opt(
        "--threads",
        type=thread_count,
        default=threads,
        help=f"torch CPU threads (default: {threads or 'torch' + chr(39) + 's'}; one is "
        "fastest for small models and on a busy CPU)",
    )
    add_output_options(parser, resume=resume, replaces="run")


def _add_run_arguments(parser) -> None:
    """The options of one run: optimiser, seed, learning rate, weight decay."""
    opt = parser.add_argument
    opt(
        "--optim",
        choices=sorted(training.optimizer_names("full")),
        default="adamw",
        help="optimiser (default: %(default)s)",
    )
    opt(
        "--seed",
        type=seed,
        default=0,
        help="seed of the split, init and batches, in [0, 2**32) (default 0)",
    )
    opt("--lr", type=positive_float, help="learning rate (default: per optimiser and task)")
    opt(
        "--weight-decay",
        type=nonnegative_float,
        help="weight decay (default: per optimiser and task)",
    )


def add_arguments(parser) -> None:
    add_common_arguments(parser, steps=None)


def config_from_args(args, **override) -> training.RunConfig:
    """The ``RunConfig`` of parsed arguments; ``override`` replaces fields given as not None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(training.RunConfig)}
    fields = {k: v for k, v in given.items() if v is not None}
    fields.update({k: v for k, v in override.items() if v is not None})
    return training.RunConfig(**fields)


@contextlib.contextmanager
def progress(args, total: int, label: str, bar=None):
    """Hooks ``on_step`` / ``on_eval`` driving a tqdm bar on stderr (off when not a TTY or
    ``--quiet``); ``bar`` reuses an outer bar whose counter spans several runs."""
    from tqdm import tqdm

    quiet = args.quiet or not sys.stderr.isatty()
    own = bar is None
    bar = tqdm(total=total, disable=quiet, file=sys.stderr, dynamic_ncols=True) if own else bar
    bar.set_description(label)
    base = bar.n

    def on_step(step):
        bar.update(base + step - bar.n)

    def on_eval(record):
        bar.update(base + record["step"] - bar.n)
        loss = record["val_loss"]
        bar.set_postfix(val_loss="n/a" if loss is None else f"{loss:.4f}")

    try:
        yield dict(on_step=on_step, on_eval=on_eval)
    finally:
        if own:
            bar.close()


def describe(summary: dict) -> str:
    """One line: the final / best target metric, when the target was reached, time per step."""
    c, hit = summary["config"], summary["steps_to_target"]
    target = "target not reached" if hit is None else f"target reached at step {hit}"
    final, best = (
        f"{v:.4f}" if v is not None else "n/a" for v in (summary["final"], summary["best"])
    )
    run = f"{c['task']} {c['model']} {c['optim']} seed {c['seed']}"
    stop = summary.get("diverged")
    if stop:
        return (
            f"{run}: diverged at step {stop['step']} ({stop['reason']}); stopped there "
            f"(best {summary['metric']} {best})"
        )
    return (
        f"{run}: {summary['metric']} {final} "
        f"(best {best}), {target if summary['target'] is not None else 'no target'}, "
        f"{summary['ms_per_step']:.1f} ms/step"
    )


def run(args) -> int:
    cfg = config_from_args(args)
    training.claim_out(args.out, resume=args.resume, force=args.force)
    with progress(args, cfg.steps, f"{cfg.task} {cfg.optim}") as hooks:
        summary = training.train(cfg, args.out, resume=args.resume, **hooks)
    print(f"{describe(summary)}; wrote {args.out}")
    return 0
