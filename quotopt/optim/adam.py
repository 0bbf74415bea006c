"""QuotientAdam: Adam on the quotient of every bundle group, AdamW on the other groups."""

from __future__ import annotations

import torch

from . import validation as rules
from .base import QuotientOptimizer
from .functional import adam_bundle_update
from .plain import adam_plain_in_place, adam_plain_updates

__all__ = ["QuotientAdam"]


class QuotientAdam(QuotientOptimizer):
    r"""Adam with decoupled weight decay on quotient manifolds (a ``torch.optim.Optimizer``).

    Groups without a ``"bundle"`` are exactly ``torch.optim.AdamW``. On a bundle group with point
    p and Euclidean gradient ∇f, one step is (``quotopt.optim.functional``):

    * every ``dress_every`` steps, starting with the first: p ← p·u(p), the first moment
      pushed forward by u(p), ∇f carried as a covector (heads that cannot be dressed — rank
      deficient to working precision — stay where they are);
    * ξ = grad_metric f — the Riemannian gradient under the bundle's metric, horizontal for a
      G-invariant loss (one factorisation of p serves this step's gradient, moments and
      projection, and the next step reuses the new point's);
    * m ← β₁m + (1-β₁)ξ (m lives in the horizontal space at p);
      v ← β₂v + (1-β₂)·slice_mean_square(p, ξ), the bundle's **gauge-invariant mean squares
      per slice no symmetry mixes**: per row of each head factor (for GL(r) heads, weighted by
      the other factor's Gram matrix under the invariant metric), per model-space row for O(d);
    * d = P_H(m̂ / (max(√v̂, rms(m̂)/c) + ε)) with rms(m̂)² = slice_mean_square(p, m̂) and
      c = ``functional.RATIO_BOUND`` (2): no slice of d exceeds c in the metric's RMS, even
      where the metric drifts faster than v̂ follows it (the invariant metric at ill-conditioned
      heads, where m̂/√v̂ would otherwise compound from step to step); then bounded by
      ``bundle.limit_step`` (invariant head metric: a head's step is shortened where its
      second-order change of W_q W_kᵀ would exceed half the
      first-order one — only at ill-conditioned factors);
      p ← retract(scale_invariants(p, 1 - lr·wd), -lr·d); m ← P_H at the new point.

    Why per-slice second moments (option (b) of the design notes) rather than per-coordinate
    moments in dressed coordinates (option (a)): a per-coordinate moment picks a basis that the
    symmetry rotates, so it only becomes equivariant by re-dressing every step and carrying
    the state through each dressing correction, which a GL(r) element does not preserve
    (v is not a tensor that GL acts on). Per-slice moments are invariant by construction, cost
    one fused reduction, and keep per-row adaptivity where no symmetry acts.

    Weight decay acts on the orbit: ``bundle.scale_invariants`` multiplies every invariant linear
    map by (1 - lr·wd) — each head's W_q W_kᵀ and W_v W_o (so each factor by √(1 - lr·wd)), and
    O(d)-rotated tensors directly. Scalar scaling commutes with the action, so the decay is
    gauge-equivariant. Note that on heads this is half AdamW's decay of the product
    (AdamW shrinks both factors, so the product by (1 - lr·wd)²): tune wd per optimiser.

    Gauge equivariance: with a G-invariant metric (``"invariant"`` heads without damping, O(d))
    every operation commutes with the action — the step bound included, since it is computed
    from gauge-invariant norms — so runs from p and p·g stay on the same orbits up to
    round-off. With the Euclidean head metric, equivariance comes from dressing before the first
    step (the default ``dress_every``); ``dress_every=None`` turns dressing off. A damped
    invariant metric (``HeadQK(..., metric="invariant", damping=δ)``, the choice for rank-
    deficient starts such as LoRA's B = 0) is only O(r)-invariant: equivariance is then exact
    for orthogonal g and approximate, to O(δ), for general g (dressing restores it for runs
    that start from the same orbit through full-rank points).

    Args:
        params: tensors or param groups; a group may carry ``"bundle"`` (a
            ``manifolds.Bundle``), ``"layout"`` (see ``quotopt.optim.base``) and ``"name"``.
        lr, betas, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.
        dress_every: re-dress bundle groups before step 1 and every ``dress_every`` steps;
            ``None`` never dresses.
        nonfinite: ``"raise"`` (default) — a step that would write non-finite values raises
            ``NonFiniteStepError`` naming the group (and, on the CPU, the heads at fault) and
            writes nothing; ``"skip"`` skips such steps with a ``SkippedStepWarning``, counted
            per group by ``skipped_steps()``. Either way parameters and state stay
            bit-identical.
        foreach, fused, capturable, differentiable: not implemented; rejected when set.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        maximize: bool = False,
        dress_every: int | None = 100,
        nonfinite: str = "raise",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        rules.reject_unsupported(
            "QuotientAdam",
            dict(
                foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable
            ),
        )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            dress_every=dress_every,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _init_state(self, group: dict, point: tuple) -> dict:
        bundle = group.get("bundle")
        if bundle is None:
            (param,) = point
            zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
            return {"step": self._zero_step(param), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        zeros = tuple(torch.zeros_like(t) for t in point)
        second = tuple(torch.zeros_like(s) for s in bundle.slice_mean_square(point, zeros))
        return {"step": self._zero_step(point[0]), "exp_avg": zeros, "exp_avg_sq": second}

    _plain_update = staticmethod(adam_plain_updates)
    _plain_in_place = staticmethod(adam_plain_in_place)
    _checked_state = ("exp_avg_sq",)  # an infinite v would zero the step instead of spreading
    _bundle_update = staticmethod(adam_bundle_update)

    def _check_hyperparameters(self, name: str, group: dict) -> None:
        rules.number(name, "learning rate", group["lr"])
        rules.number(name, "epsilon value", group["eps"])
        rules.number(name, "weight_decay value", group["weight_decay"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: Invalid betas: {betas!r} (expected a pair)")
        for index, beta in enumerate(betas):
            rules.unit_interval(name, f"beta parameter at index {index}", beta)
        rules.decoupled_decay(name, group["lr"], group["weight_decay"])
        rules.dress_every(name, group["dress_every"])

    def _hyperparameters(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )
