r"""QuotientSGD: Riemannian SGD with momentum on the quotient; plain SGD on the other groups.

The class, its state (``SGDState``), its pure bundle update (``sgd_bundle_update``) and its
plain update (``sgd_plain_updates``). Theory: docs/theory/optimisers.md#quotientsgd.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from manifolds.frame import Frame

from . import validation as rules
from .base import QuotientOptimizer
from .moments import axpy, momentum_buffer
from .redress import begin_step

__all__ = ["QuotientSGD", "SGDState", "sgd_bundle_update", "sgd_plain_updates"]

Tensors = tuple[torch.Tensor, ...]


class _Steps(TypedDict):
    step: torch.Tensor  # () float64: steps taken (the buffer starts as the first direction)


class SGDState(_Steps, total=False):
    """QuotientSGD's state of one bundle group (under its first parameter) or one plain
    tensor. ``momentum_buffer`` (only with momentum) is a tuple shaped like the point,
    horizontal there, for a bundle group, and shaped like the tensor for a plain one."""

    momentum_buffer: torch.Tensor | Tensors


def sgd_bundle_update(
    frame: Frame,
    grad: Tensors,
    state: SGDState,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
    dress: bool = False,
):
    """One QuotientSGD step on a bundle group at ``frame`` (``bundle.at(point)``), out of place
    (the algorithm of ``QuotientSGD``). Returns ``(new_point, new_state, new_frame)``."""
    moments = (state["momentum_buffer"],) if momentum else ()
    frame, grad, moments = begin_step(frame, grad, moments, maximize=maximize, dress=dress)
    rgrad = frame.riemannian_gradient(grad)  # horizontal for invariant losses
    new_state = SGDState(step=state["step"] + 1)
    direction = rgrad
    if momentum:
        buf = momentum_buffer(moments[0], rgrad, state["step"], momentum, dampening)
        direction = axpy(rgrad, buf, momentum) if nesterov else buf
    # the momentum is horizontal (transported), the gradient too: no projection
    new_point = frame.descend(direction, lr, weight_decay, project=False)
    new_frame = frame.moved(new_point)
    if momentum:
        new_state["momentum_buffer"] = new_frame.horizontal(buf)
    return new_point, new_state, new_frame


def sgd_plain_updates(
    params: list,
    grads: list,
    states: list[SGDState],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
) -> tuple[list, list[SGDState]]:
    """``torch.optim.SGD``'s update (coupled L2 decay) of every tensor of a group, out of
    place: (new params, new states)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    new_states = [SGDState(step=state["step"] + 1) for state in states]
    if momentum:
        directions = []
        for grad, state, new_state in zip(grads, states, new_states):
            buf = state["momentum_buffer"]
            buf = momentum_buffer(buf, grad, state["step"], momentum, dampening)
            new_state["momentum_buffer"] = buf
            directions.append(grad + momentum * buf if nesterov else buf)
        grads = directions
    return torch._foreach_add(params, grads, alpha=-lr), new_states


class QuotientSGD(QuotientOptimizer):
    r"""Stochastic gradient descent on quotient manifolds (a ``torch.optim.Optimizer``).

    Groups without a ``"bundle"`` are exactly ``torch.optim.SGD`` (coupled L2 weight decay). A
    bundle group with point p, Euclidean gradient ∇f and buffer b takes the step
    (``sgd_bundle_update``)::

        every dress_every steps:  p ← p·u(p),  b ← b·u(p),  ∇f ← act_dual(∇f, u(p))
        ξ = grad_metric f(p)                              # horizontal for an invariant loss
        b ← ξ at the first step, else μ b + (1 − τ) ξ;    d = ξ + μ b if nesterov else b
        p ← retract(scale_invariants(p, 1 − lr·wd), −lr·d);   b ← P_H b at p

    The buffer starts as ξ, torch's rule (geoopt's RiemannianSGD seeds it with the raw
    Euclidean gradient, so its first step is not horizontal). Weight decay on bundle groups is
    decoupled and scales the invariants (see ``QuotientAdam``): an L2 gradient wd·p would add a
    tangent vector to a covector and break gauge equivariance. Why: docs/theory/optimisers.md.

    Args: as ``torch.optim.SGD`` plus ``dress_every`` and ``nonfinite`` (see ``QuotientAdam``).

    References: Robbins & Monro 1951; Absil, Mahony & Sepulchre 2008, ch. 4 (Riemannian
    gradient descent); Sutskever et al. 2013 (momentum as in torch).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        dress_every: int | None = 100,
        nonfinite: str = "raise",
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        rules.reject_unsupported(
            "QuotientSGD", dict(foreach=foreach, fused=fused, differentiable=differentiable)
        )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            dress_every=dress_every,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _init_state(self, group: dict, point: tuple) -> SGDState:
        state = SGDState(step=self._zero_step(point[0]))
        if group["momentum"]:
            buffers = tuple(t.new_zeros(t.shape) for t in point)
            state["momentum_buffer"] = buffers if group.get("bundle") is not None else buffers[0]
        return state

    def _check_hyperparameters(self, name: str, group: dict) -> None:
        rules.number(name, "learning rate", group["lr"])
        rules.number(name, "momentum value", group["momentum"])
        rules.number(name, "dampening value", group["dampening"])
        rules.number(name, "weight_decay value", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{name}: Nesterov momentum requires a momentum and zero dampening")
        if group.get("bundle") is not None:  # decoupled decay on the invariants
            rules.decoupled_decay(name, group["lr"], group["weight_decay"])
        rules.dress_every(name, group["dress_every"])

    def _hyperparameters(self, group: dict) -> dict:
        names = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
        return {k: group[k] for k in names}

    _bundle_update = staticmethod(sgd_bundle_update)
    _plain_update = staticmethod(sgd_plain_updates)
