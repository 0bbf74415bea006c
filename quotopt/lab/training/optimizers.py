"""The optimiser registry: every optimiser of the laboratory by name, for every command.

``OPTIMIZERS`` maps a name to its ``OptimizerSpec`` (``optimizer_spec``); the entries are
``catalogue.CATALOGUE``. ``quotopt train``, ``compare`` and ``study`` build full-model
optimisers with ``build_optimizer``; ``quotopt finetune`` builds adapter optimisers with
``build_adapter_optimizer``; ``quotopt.lab.study.protocol`` derives its families, labels and roles
from the entries.

A run detects the model's symmetries once: ``detect(name, model)`` gives the groups that the
optimiser ``name`` steps on, and the run passes them to the builder (``groups=``) and reads
its gauge transformation and diagnostics from them. Without ``groups`` a builder that needs
them detects them itself, once.
"""

from __future__ import annotations

import torch
from torch import nn

from ...groups import symmetries
from .catalogue import CATALOGUE
from .optimizer_spec import SETTINGS, Build, OptimizerSpec

__all__ = [
    "OPTIMIZERS",
    "build_adapter_optimizer",
    "build_optimizer",
    "default_hparams",
    "detect",
    "lookup_optimizer",
    "optimizer_names",
    "register_optimizer",
]

OPTIMIZERS: dict[str, OptimizerSpec] = {}
#: how an unknown name is reported, per setting
_KIND = {"full": "optimiser", "lora": "fine-tuning optimiser"}


def register_optimizer(entry: OptimizerSpec) -> None:
    """Make ``entry`` available to every command under ``entry.name`` (``ValueError`` if the
    name is taken)."""
    if entry.name in OPTIMIZERS:
        raise ValueError(f"optimiser {entry.name!r} is registered already; choose another name")
    OPTIMIZERS[entry.name] = entry


for _entry in CATALOGUE:
    register_optimizer(_entry)


def optimizer_names(setting: str = "full") -> tuple[str, ...]:
    """The names of the optimisers that serve ``setting`` (``"full"`` or ``"lora"``), in
    registration order."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    return tuple(name for name, entry in OPTIMIZERS.items() if setting in entry.settings)


def lookup_optimizer(name: str, setting: str = "full") -> OptimizerSpec:
    """The entry of ``name``; ``ValueError`` naming the valid names if it does not serve
    ``setting``."""
    valid = optimizer_names(setting)
    if name not in valid:
        raise ValueError(
            f"unknown {_KIND[setting]} {name!r}; valid names are {', '.join(sorted(valid))}"
        )
    return OPTIMIZERS[name]


def default_hparams(name: str, task: str | None) -> tuple[float, float]:
    """Default ``(lr, weight_decay)`` of the full-model optimiser ``name`` on ``task``."""
    return lookup_optimizer(name).hparams(task)


def detect(name: str, model: nn.Module, setting: str = "full", damping: float = 1e-2):
    """The symmetry groups of ``model`` that optimiser ``name`` steps on in ``setting``:
    ``quotopt.symmetries`` under the entry's metric; on adapters every trainable parameter
    must be covered (``plain=False``) and the invariant metric is damped by ``damping``."""
    metric = lookup_optimizer(name, setting).metric
    if setting == "lora":
        return symmetries(model, metric=metric, lora_damping=damping, plain=False)
    return symmetries(model, metric=metric)


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas=(0.9, 0.999),
    task: str | None = None,
    groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` over every parameter of ``model``; lr and weight decay default to
    the entry's for ``task``; ``groups``: ``detect(name, model)`` as the run holds them."""
    entry = lookup_optimizer(name)
    d_lr, d_wd = entry.hparams(task)
    lr, weight_decay = d_lr if lr is None else lr, d_wd if weight_decay is None else weight_decay
    build = Build(
        model,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        ratio=None,
        damping=None,
        groups=groups,
        detect=lambda: detect(name, model),
    )
    return entry.build["full"](build)


def build_adapter_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    *,
    ratio: float = 16.0,
    damping: float = 1e-2,
    weight_decay: float = 0.0,
    betas=(0.9, 0.999),
    groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` over the trainable LoRA adapters of ``model`` (B = 0 at the
    start); ``ratio``: LoRA+'s η_B / η_A; ``damping``: of the invariant metric on adapters;
    ``ValueError`` for an unknown name or a model without trainable adapters."""
    entry = lookup_optimizer(name, "lora")
    build = Build(
        model,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        ratio=ratio,
        damping=damping,
        groups=groups,
        detect=lambda: detect(name, model, "lora", damping),
    )
    return entry.build["lora"](build)
