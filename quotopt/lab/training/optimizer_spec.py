"""One optimiser of the laboratory, as the registry (``training.optimizers``) holds it.

An ``OptimizerSpec`` says what the optimiser is (name, label, what it does to the symmetry,
its hyperparameter family, whether it steps on the quotient) and how to build it in each
setting it serves: ``"full"`` (every parameter of a model: ``quotopt train``, ``compare``,
``study``) or ``"lora"`` (the trainable LoRA adapters of a model: ``quotopt finetune``). A
builder receives a ``Build``: the model, its symmetry groups as the run detected them, and the
hyperparameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

__all__ = ["FAMILIES", "SETTINGS", "Build", "Builder", "OptimizerSpec"]

#: where an optimiser can run: a whole model, or the LoRA adapters of a frozen one
SETTINGS = ("full", "lora")
#: hyperparameter families: decoupled decay or decay on invariants (one grid of the study), or
#: coupled L2 decay (another)
FAMILIES = ("adam", "sgd")
METRICS = ("euclidean", "invariant")


class Build:
    """What a builder receives: ``model``, ``lr``, ``weight_decay``, ``betas``, the LoRA
    hyperparameters ``ratio`` (LoRA+'s η_B / η_A) and ``damping`` (of the invariant metric on
    adapters), and ``groups``: the model's symmetry groups, either those the run detected
    (passed in) or detected here on first use by ``detect()``, once."""

    def __init__(self, model, *, lr, weight_decay, betas, ratio, damping, groups, detect):
        self.model, self.lr, self.weight_decay = model, lr, weight_decay
        self.betas, self.ratio, self.damping = tuple(betas), ratio, damping
        self._groups, self._detect = groups, detect

    @property
    def groups(self) -> list[dict]:
        if self._groups is None:
            self._groups = self._detect()
        return self._groups


Builder = Callable[[Build], torch.optim.Optimizer]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimiser.

    Args:
        name: the registry key, used by every command and stored in run configurations.
        label: how reports and figures name it.
        role: one sentence: what it does to the model's symmetry.
        family: ``"adam"`` or ``"sgd"``: the study's hyperparameter grid.
        quotient: whether it steps on the quotient by the symmetry groups.
        build: setting (``"full"``, ``"lora"``) -> builder; the keys are the settings served.
        metric: metric of the symmetry groups the run detects for it.
        defaults: ``"full"`` only: task name or ``"*"`` -> default ``(lr, weight_decay)``.
        secondary: ``"lora"`` only: the hyperparameter tuned after the learning rate
            (``"ratio"`` or ``"damping"``), or None.
    """

    name: str
    label: str
    role: str
    family: str
    quotient: bool
    build: Mapping[str, Builder]
    metric: str = "euclidean"
    defaults: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    secondary: str | None = None

    def __post_init__(self):
        full = "full" not in self.build or "*" in self.defaults
        self._require("family", self.family, self.family in FAMILIES, f"one of {FAMILIES}")
        self._require("metric", self.metric, self.metric in METRICS, f"one of {METRICS}")
        served = bool(self.build) and set(self.build) <= set(SETTINGS)
        self._require("build", tuple(self.build), served, f"a mapping from {SETTINGS} to builders")
        self._require("defaults", dict(self.defaults), full, "a '*' entry for full models")
        second = self.secondary in (None, "ratio", "damping")
        self._require("secondary", self.secondary, second, "None, 'ratio' or 'damping'")
        self._require("role", self.role, self.role.endswith("."), "one sentence ending in '.'")

    def _require(self, field: str, value, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"optimiser {self.name!r}: {field} must be {rule}, got {value!r}")

    @property
    def settings(self) -> tuple[str, ...]:
        return tuple(s for s in SETTINGS if s in self.build)

    def hparams(self, task: str | None) -> tuple[float, float]:
        """Default ``(lr, weight_decay)`` on ``task`` (full models)."""
        return self.defaults.get(task, self.defaults["*"])
