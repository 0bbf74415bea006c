"""Argument types of the ``quotopt`` commands: each turns the text of one option into a value or
refuses it with ``argparse.ArgumentTypeError`` stating the rule and the value, so that every
usage error is one line and comes before anything is created."""

from __future__ import annotations

import argparse
import math
import os

from ..training import MAX_SEED
from ..training.optimizers import optimizer_names


def _refuse(rule: str, text: str):
    return argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")


def _integer(text: str, rule: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _refuse(rule, text) from None


def positive_int(text: str) -> int:
    """An integer >= 1 (``--steps``, ``--eval-every``, ``--workers``)."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise _refuse("a positive integer", text)
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (``--batch-size``: 0 is the full batch; ``--max-extend``)."""
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise _refuse("an integer >= 0", text)
    return value


def seed(text: str) -> int:
    """An integer in [0, 2**32) (``RunConfig.seed``)."""
    rule = "an integer in [0, 2**32)"
    value = _integer(text, rule)
    if not 0 <= value < MAX_SEED:
        raise _refuse(rule, text)
    return value


def seeds(text: str) -> list[int]:
    """Comma-separated seeds, each an integer in [0, 2**32), without repeats (``--seeds``)."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    if not parts:
        raise _refuse("comma-separated integers like 0,1,2", text)
    return list(dict.fromkeys(seed(s) for s in parts))


def _float(text: str, rule: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _refuse(rule, text) from None
    if not (math.isfinite(value) and ok(value)):
        raise _refuse(rule, text)
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``--lr``, ``--max-memory``: inf and nan are refused)."""
    return _float(text, "a finite number > 0", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (``--weight-decay``)."""
    return _float(text, "a finite number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (``--rel-tol``)."""
    return _float(text, "a number > 0 and < 1", lambda v: 0 < v < 1)


def positive_floats(text: str) -> list[float]:
    """Comma-separated finite numbers > 0, sorted, without repeats (``--lrs``)."""
    parts = [v.strip() for v in text.split(",") if v.strip()]
    if not parts:
        raise _refuse("comma-separated finite numbers > 0 like 1e-3,3e-3", text)
    return sorted(dict.fromkeys(positive_float(v) for v in parts))


def optimizer_list(text: str, setting: str = "full") -> list[str]:
    """Comma-separated names of registered optimisers that serve ``setting`` (``"full"``
    models or ``"lora"`` adapters), without repeats (``--optims``)."""
    valid = optimizer_names(setting)
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimiser {', '.join(unknown) or '(none)'}; valid names are "
            f"{', '.join(sorted(valid))}"
        )
    return names


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _at_most_cpus(text: str, noun: str) -> int:
    value, cpus = positive_int(text), available_cpus()
    if value > cpus:
        raise argparse.ArgumentTypeError(f"{value} {noun} exceed the {cpus} CPUs available")
    return value


def thread_count(text: str) -> int:
    """A positive integer no larger than ``available_cpus()`` (``--threads``): more threads
    than CPUs cannot speed anything up, and torch allocates per-thread state for every one."""
    return _at_most_cpus(text, "threads")


def worker_count(text: str) -> int:
    """A positive integer no larger than ``available_cpus()`` (``--workers``: one process of
    one thread each)."""
    return _at_most_cpus(text, "workers")


def directory(text: str) -> str:
    """A non-empty path (``--out``: an empty one would write into the current directory)."""
    if not text.strip():
        raise _refuse("a non-empty directory path", text)
    return text


def add_output_options(parser, *, resume: str | None, replaces: str = "study") -> None:
    """The options every command that writes a directory shares: ``--out``, ``--resume`` (its
    help ``resume``; none where it is None), ``--force`` (replace a previous ``replaces`` in
    OUT) and ``--quiet``."""
    opt = parser.add_argument
    opt("--out", type=directory, required=True, help="output directory")
    if resume is not None:
        opt("--resume", action="store_true", help=resume)
    opt("--force", action="store_true", help=f"replace a previous {replaces} in OUT")
    opt("--quiet", action="store_true", help="no progress bar")


#: ``--quick``'s pretrained byte decoder: one layer of width 32, 20 steps
QUICK_PRETRAIN = dict(
    hidden_size=32,
    layers=1,
    heads=2,
    intermediate_size=64,
    seq_len=32,
    steps=20,
    batch_size=4,
    warmup=5,
    max_bytes=50_000,
)


def add_pretrained_options(parser) -> None:
    """The options of the commands on a pretrained byte decoder (``finetune``, ``quantise``):
    ``--quick`` (``QUICK_PRETRAIN`` and tiny sizes), ``--cache`` and ``--threads``."""
    opt = parser.add_argument
    opt("--quick", action="store_true", help="tiny sizes: the whole protocol in seconds")
    opt(
        "--cache",
        type=directory,
        help="pretrained-model cache (default $QUOTOPT_CACHE or ~/.cache/quotopt)",
    )
    opt("--threads", type=thread_count, default=1, help="torch CPU threads (default 1)")
