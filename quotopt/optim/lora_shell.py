r"""The shell of the optimisers that step LoRA adapters pair by pair (``LoRAPairOptimizer``).

Some LoRA optimisers need both factors of an adapter at once (the frame of one factor
preconditions the other's gradient): LoRA-RITE (``quotopt.lab.baselines.lora_rite``) and the
dressed-frame matrix Adam (``quotopt.optim.matrix_adam``). Their pairs are found per adapter module
(``quotopt.groups.lora_pairs``: ``peft`` layers and ``LoRALinear``), never by the order of a
parameter list, and stacked by shape: one param group per (d_out, r, d_in) holding
``[B₁, A₁, B₂, A₂, …]`` (B (d_out, r), A (r, d_in)), whose update sees the stacked point
(B (n, d_out, r), A (n, r, d_in)) and gradients, and keeps its state under the group's first
parameter (so ``state_dict`` and ``load_state_dict`` are torch's, and load with
``torch.load(weights_only=True)``).

A step is computed out of place for every group, then committed only if every new parameter
and state tensor is finite (one host read per step) and no factorisation failed; otherwise it
raises ``NonFiniteStepError`` and writes nothing, as the quotient optimisers do
(``quotopt.optim.guard``).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from ..groups import lora_pairs
from .guard import NonFiniteStepError
from .moments import step_counter

__all__ = [
    "LoRAPairOptimizer",
    "adapter_groups",
    "bias_corrected_decay",
    "check_number",
    "inverse_root",
]


def adapter_groups(model: nn.Module, owner: str) -> list[dict]:
    """One group per adapter shape, ``params`` = [B₁, A₁, …] paired by module (module
    docstring). ``ValueError`` (naming ``owner``) without trainable adapters, or with trainable
    parameters that are not adapter factors."""
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError(f"{owner}: the model has no trainable LoRA adapters")
    adapters = {id(p) for _, b, a in pairs for p in (b, a)}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if others:
        raise ValueError(
            f"{owner}: trainable parameters outside the adapters ({', '.join(others[:3])}"
            f"{', …' if len(others) > 3 else ''}); freeze them or give them their own optimiser"
        )
    by_shape: dict[tuple[int, int, int], dict] = {}
    for name, b, a in pairs:
        shape = (b.shape[0], b.shape[1], a.shape[1])
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{owner}: adapter {name} has B {tuple(b.shape)} and A {tuple(a.shape)}, "
                "whose ranks differ"
            )
        empty = {"params": [], "adapters": [], "name": "lora.{}x{}x{}".format(*shape)}
        group = by_shape.setdefault(shape, empty)
        group["params"] += [b, a]
        group["adapters"].append(name)
    return list(by_shape.values())


def bias_corrected_decay(step: torch.Tensor, beta: float, dtype: torch.dtype) -> torch.Tensor:
    """β(1 − β^{t−1}) / (1 − β^t) for the 0-based float64 ``step`` (t = step + 1): an EMA with
    this decay needs no bias correction (Shazeer & Stern 2018, Adafactor, §7.1); 0 at t = 1."""
    t = step + 1
    return (beta * (1 - beta ** (t - 1)) / (1 - beta**t)).to(dtype)


def inverse_root(v: torch.Tensor, eps: float, ridge: torch.Tensor | float = 0.0):
    """(V + ridge·I)^{-1/2} with ε outside the root, per matrix of the batch: Q diag(1 / (√(λ
    + ridge) + ε)) Qᵀ for V = Q diag(λ) Qᵀ (eigenvalues below 0, round-off of a positive
    semi-definite V, taken as 0)."""
    lam, q = torch.linalg.eigh(v)
    ridge = ridge.unsqueeze(-1) if isinstance(ridge, torch.Tensor) else ridge
    scale = 1 / ((lam.clamp(min=0) + ridge).sqrt() + eps)
    root = (q * scale.unsqueeze(-2)) @ q.mT
    return (root + root.mT) / 2


def check_number(owner: str, name: str, value, low: float = 0.0, below_one: bool = False) -> None:
    """``ValueError`` naming ``owner`` and ``name`` unless ``value`` is a finite number ≥ ``low``
    (and < 1 with ``below_one``)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= low
    if ok and below_one:
        ok = value < 1
    if not ok:
        rule = f"in [{low:g}, 1)" if below_one else f"a finite number ≥ {low:g}"
        raise ValueError(f"{owner}: {name} must be {rule}, got {value!r}")


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(t.isfinite().all()) for t in tensors)


class LoRAPairOptimizer(abc.ABC, torch.optim.Optimizer):
    """Adapter pairs of one shape stepped together (module docstring). Subclasses define
    ``_init_state(b, a)`` and ``_updates(work)``: for a list of (group, B, A, ∇B, ∇A, state,
    fresh) (stacked; ``fresh``: the group's first step), the list of (new B, new A, new
    state)."""

    def __init__(self, model: nn.Module, defaults: dict):
        owner = type(self).__name__
        check_number(owner, "learning rate", defaults["lr"])
        for key in ("weight_decay", "eps"):
            if key in defaults:
                check_number(owner, key, defaults[key])
        if "betas" in defaults:
            betas = defaults["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"{owner}: betas must be a pair, got {betas!r}")
            for i, beta in enumerate(betas):
                check_number(owner, f"betas[{i}]", beta, below_one=True)
            defaults = dict(defaults, betas=tuple(betas))
        super().__init__(adapter_groups(model, owner), defaults)

    @abc.abstractmethod
    def _init_state(self, b: torch.Tensor, a: torch.Tensor) -> dict:
        """The state of a group of stacked adapters B (n, d_out, r), A (n, r, d_in) before its
        first step: tensors only."""

    @abc.abstractmethod
    def _updates(self, work: list) -> list:
        """For each (group, B, A, ∇B, ∇A, state, fresh) of ``work``, (new B, new A, new state),
        out of place; ``fresh``: the group's first step."""

    #: a step counter at zero on a tensor's device, for ``_init_state``
    _zero_step = staticmethod(step_counter)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            b, a = torch.stack(params[0::2]), torch.stack(params[1::2])
            gb, ga = torch.stack(grads[0::2]), torch.stack(grads[1::2])
            fresh = params[0] not in self.state
            state = self._init_state(b, a) if fresh else self.state[params[0]]
            work.append((group, b, a, gb, ga, state, fresh))
        if not work:
            return loss
        try:
            results = self._updates(work)
        except torch.linalg.LinAlgError as error:  # a factorisation of non-finite values
            raise NonFiniteStepError(
                f"{type(self).__name__}: a factorisation failed inside the step "
                f"({str(error).splitlines()[0]}); nothing was written"
            ) from None
        checked = [t for b, a, state in results for t in (b, a, *state.values())]
        finite = torch.stack([t.sum() for t in checked]).isfinite()
        if not bool(finite.all()):
            bad = sorted({w[0]["name"] for w, (b, a, _) in zip(work, results) if not _finite(b, a)})
            raise NonFiniteStepError(
                f"{type(self).__name__}: the step is not finite (in {', '.join(bad) or 'the state'}"
                "; non-finite gradients, or a step too large for the parameters' precision); "
                "nothing was written"
            )
        for (group, *_), (new_b, new_a, new_state) in zip(work, results):
            params = group["params"]
            for i, (b, a) in enumerate(zip(params[0::2], params[1::2])):
                b.copy_(new_b[i])
                a.copy_(new_a[i])
            self.state[params[0]] = new_state
        return loss
