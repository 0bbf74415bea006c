"""QuotientSGD: Riemannian SGD with momentum on the quotient; plain SGD on other groups."""

from __future__ import annotations

from . import validation as rules
from .base import QuotientOptimizer
from .functional import sgd_bundle_update
from .plain import sgd_plain_updates

__all__ = ["QuotientSGD"]


class QuotientSGD(QuotientOptimizer):
    r"""Stochastic gradient descent on quotient manifolds (a ``torch.optim.Optimizer``).

    Groups without a ``"bundle"`` are exactly ``torch.optim.SGD`` (coupled L2 weight decay).
    On a bundle group with point p (``quotopt.optim.functional.sgd_bundle_update``):

    * every ``dress_every`` steps, starting with the first, p ← p·u(p) (moment pushed forward);
    * ξ = P_H(grad_metric f), the horizontal lift of the quotient gradient;
    * momentum the torch way: the buffer *starts as* ξ (geoopt's RiemannianSGD seeds it with
      the raw Euclidean gradient and then adds ξ, so its first step is (1+μ)·lr along a
      non-horizontal vector), then b ← μ·b + (1-τ)·ξ; Nesterov uses ξ + μ·b;
    * p ← retract(decay(p, 1 - lr·wd), -lr·d) and b ← P_H(b) at the new point.

    Weight decay on bundle groups is decoupled and acts on the invariants (see
    ``QuotientAdam``): an L2 gradient wd·p would add a tangent vector to a covector and break
    gauge equivariance under the invariant metric.

    Args: as ``torch.optim.SGD`` plus ``dress_every`` and ``nonfinite`` (see ``QuotientAdam``).
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

    def _init_state(self, group: dict, point: tuple) -> dict:
        state = {"step": self._zero_step(point[0])}
        if group["momentum"]:
            buffers = tuple(t.new_zeros(t.shape) for t in point)
            state["momentum_buffer"] = buffers if group.get("bundle") is not None else buffers[0]
        return state

    _plain_update = staticmethod(sgd_plain_updates)
    _bundle_update = staticmethod(sgd_bundle_update)

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
