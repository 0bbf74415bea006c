r"""Optimisation over the fibre: the group elements are the variables, the function stays fixed.

A ``Plan`` names the factors to learn or fix: each ``Factor`` produces one part of the fibre
(``quotopt.gauge.fibre.PARTS``) from a variable of one of three kinds —

* ``"orthogonal"`` O(n), retraction by the Cayley transform g ← g (I − ξ/2)⁻¹(I + ξ/2);
* ``"general"``   GL(n) (and GL(1) per MLP unit), retraction g ← g exp(ξ), which stays in the
  component of the start (positive scales stay positive);
* ``"rotary"``    (C*)^m in 2×2 real blocks, retraction g ← g exp(ξ) blockwise, in C;

— optionally ``shared`` by every head of a block (one element per block broadcast over its
key/value heads: SpinQuant's R2, FlatQuant's per-layer matrix). ``GaugeSearch`` minimises an
objective of the moved weights ``fibre.act(weights, elements)`` by Adam in the Lie algebra
(trivialised at each element, Lezcano-Casado 2019): at g the gradient ∇ pulls back to
ξ = proj(gᵀ∇) (skew part for O(n), complex-linear part per block for (C*)^m, all of gᵀ∇ for
GL), Adam's moments live in those algebra coordinates, and the step −lr·m̂/(√v̂ + ε) is
retracted from the right. A linear decay of the rate to zero over ``steps``. A step whose
objective or gradient is not finite raises ``NonFiniteStepError`` with nothing changed.
``state_dict``/``load_state_dict`` resume bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch

from ..optim.guard import NonFiniteStepError
from .fibre import PARTS, Fibre, random_hadamard

__all__ = ["Factor", "Plan", "GaugeSearch", "KINDS"]

KINDS = ("orthogonal", "general", "rotary")
_KIND_OF = dict(
    residual=("orthogonal",), ov=("orthogonal", "general"), qk=("rotary",), units=("general",)
)


@dataclasses.dataclass(frozen=True)
class Factor:
    """One part of the fibre and how its element is chosen."""

    part: str  # residual | ov | qk | units
    kind: str  # orthogonal | general | rotary
    init: str = "identity"  # identity | hadamard (QuaRot's random Hadamard)
    shared: bool = False  # one element per block for every head of it
    learn: bool = True  # False: the initial element is kept

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {self.part!r}")
        if self.kind not in _KIND_OF[self.part]:
            raise ValueError(
                f"{self.part}: kind must be one of {_KIND_OF[self.part]}, got {self.kind!r}"
            )
        if self.init not in ("identity", "hadamard"):
            raise ValueError(f"init must be 'identity' or 'hadamard', got {self.init!r}")
        if self.init == "hadamard" and self.kind != "orthogonal":
            raise ValueError(f"{self.part}: a Hadamard start needs kind='orthogonal'")
        if self.shared and self.part != "ov":
            raise ValueError(f"shared=True applies to part 'ov' only, got {self.part!r}")


Plan = tuple[Factor, ...]


def _algebra(kind: str, g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    xi = g.mT @ grad
    if kind == "orthogonal":
        return (xi - xi.mT) / 2
    if kind == "rotary":  # complex-linear part (M + K M Kᵀ)/2 of each 2×2 block
        k = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=xi.dtype, device=xi.device)
        return (xi + k @ xi @ k.mT) / 2
    return xi


def _retract(kind: str, g: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    if kind == "orthogonal":
        eye = torch.eye(step.shape[-1], dtype=step.dtype, device=step.device)
        return g @ torch.linalg.solve(eye - step / 2, eye + step / 2)
    return g @ torch.linalg.matrix_exp(step)


class GaugeSearch:
    """Adam in the Lie algebra over the factors of ``plan`` (module docstring).

    Args:
        fibre: the ``Fibre`` of ``weights``.
        weights: the starting representative (its dtype is the search's).
        plan: the factors; parts it does not name act trivially.
        objective: ``objective(moved_weights, step) -> scalar tensor`` to minimise.
        steps, lr: number of steps and peak rate (linear decay to zero).
        generator: draws the Hadamard starts' signs.
        betas, eps: Adam's.
    """

    def __init__(
        self,
        fibre: Fibre,
        weights,
        plan: Plan,
        objective,
        steps: int,
        lr: float,
        generator=None,
        betas=(0.9, 0.999),
        eps=1e-8,
    ):
        if steps < 0 or lr < 0:
            raise ValueError(f"steps and lr must be non-negative, got steps={steps}, lr={lr}")
        parts = [f.part for f in plan]
        if len(set(parts)) != len(parts):
            raise ValueError(f"plan names a part twice: {parts}")
        self.fibre, self.weights, self.plan = fibre, weights, tuple(plan)
        self.objective, self.steps, self.lr, self.betas, self.eps = objective, steps, lr, betas, eps
        dtype, device = weights.embed.dtype, weights.embed.device
        self.values = {f.part: self._start(f, generator, dtype, device) for f in plan}
        self.moments = {
            f.part: (torch.zeros_like(v), torch.zeros_like(v))
            for f, v in zip(plan, self.values.values())
            if f.learn
        }
        self.step_count, self.history = 0, []

    def _start(self, factor: Factor, generator, dtype, device) -> torch.Tensor:
        shape = self.fibre.shapes()[factor.part]
        if factor.shared:
            shape = (shape[0],) + shape[2:]
        if factor.init == "hadamard":
            n = shape[-1]
            count = 1 if len(shape) == 2 else int(torch.Size(shape[:-2]).numel())
            hs = [random_hadamard(n, generator, dtype=dtype, device=device) for _ in range(count)]
            return torch.stack(hs).reshape(shape)
        eye = torch.eye(shape[-1], dtype=dtype, device=device)
        return eye.expand(shape).clone()

    def elements(self, values=None) -> dict[str, torch.Tensor]:
        """The fibre's elements from the factors' values (shared ones broadcast over heads)."""
        values = self.values if values is None else values
        out = {}
        for f in self.plan:
            v = values[f.part]
            out[f.part] = v[:, None].expand(self.fibre.shapes()["ov"]) if f.shared else v
        return out

    def moved(self):
        """The current representative (differentiable in nothing: values are detached)."""
        return self.fibre.act(self.weights, self.elements())

    def step(self) -> float:
        """One step; returns the objective at the elements before it."""
        learn = [f for f in self.plan if f.learn]
        leaves = {p: v.detach().requires_grad_(True) for p, v in self.values.items()}
        with torch.enable_grad():
            loss = self.objective(
                self.fibre.act(self.weights, self.elements(leaves)), self.step_count
            )
            grads = torch.autograd.grad(loss, [leaves[f.part] for f in learn]) if learn else []
        loss = loss.detach()
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            raise NonFiniteStepError(
                f"gauge search step {self.step_count}: the objective or its "
                "gradient is not finite; lower lr"
            )
        b1, b2 = self.betas
        t = self.step_count + 1
        rate = self.lr * (1 - self.step_count / max(self.steps, 1))
        for f, grad in zip(learn, grads):
            g = self.values[f.part]
            xi = _algebra(f.kind, g, grad)
            m, v = self.moments[f.part]
            m.mul_(b1).add_(xi, alpha=1 - b1)
            v.mul_(b2).addcmul_(xi, xi, value=1 - b2)
            direction = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
            self.values[f.part] = _retract(f.kind, g, -rate * direction)
        self.step_count += 1
        self.history.append(float(loss))
        return float(loss)

    def run(self, on_step=None) -> list[float]:
        """Steps until ``steps``; ``on_step(step, loss)`` after each (progress, checkpoints)."""
        while self.step_count < self.steps:
            loss = self.step()
            if on_step is not None:
                on_step(self.step_count, loss)
        return self.history

    def state_dict(self) -> dict:
        return dict(
            step=self.step_count,
            history=torch.tensor(self.history, dtype=torch.float64),
            values={k: v.clone() for k, v in self.values.items()},
            moments={k: [m.clone(), v.clone()] for k, (m, v) in self.moments.items()},
        )

    def load_state_dict(self, state: dict) -> None:
        if set(state["values"]) != set(self.values):
            raise ValueError(
                f"state holds parts {sorted(state['values'])}, this plan {sorted(self.values)}"
            )
        self.step_count = int(state["step"])
        self.history = [float(x) for x in state["history"]]
        self.values = {k: v.clone() for k, v in state["values"].items()}
        self.moments = {k: (m.clone(), v.clone()) for k, (m, v) in state["moments"].items()}
