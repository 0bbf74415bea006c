r"""QuotientAdam: Adam on the quotient of every bundle group, AdamW on the other groups.

The class, its state (``AdamState``), its pure bundle update (``adam_bundle_update``) and its
plain update (``adam_plain_updates``, and ``adam_plain_in_place``, the same values computed
with bounded memory). Theory: docs/theory/optimisers.md#quotientadam-step-by-step.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from manifolds.frame import Frame

from . import validation as rules
from .base import QuotientOptimizer
from .deferred import deferred_adamw
from .moments import adam_moments, adam_step, bias_corrections, lerp
from .redress import begin_step

__all__ = [
    "CHUNK_ELEMENTS",
    "HOLD_ELEMENTS",
    "RATIO_BOUND",
    "AdamState",
    "QuotientAdam",
    "adam_bundle_update",
    "adam_plain_in_place",
    "adam_plain_updates",
]

Tensors = tuple[torch.Tensor, ...]


class AdamState(TypedDict):
    """QuotientAdam's state of one bundle group (under its first parameter) or one plain
    tensor. Bundle groups: ``exp_avg`` is a tuple shaped like the point (horizontal there),
    ``exp_avg_sq`` a tuple shaped like ``bundle.slice_mean_square``'s output (gauge-invariant
    mean squares per slice). Plain tensors: both shaped like the tensor, as in AdamW."""

    step: torch.Tensor  # () float64: steps taken
    exp_avg: torch.Tensor | Tensors  # first moment
    exp_avg_sq: torch.Tensor | Tensors  # second moment


# ---- the bundle update ---------------------------------------------------------------------

#: the bound on a slice's normalised first moment: the RMS of m̂/√v̂ per slice, measured in the
#: metric, never exceeds it (docs/theory/optimisers.md#the-ratio-bound)
RATIO_BOUND = 2.0


def adam_bundle_update(
    frame: Frame,
    grad: Tensors,
    state: AdamState,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    dress: bool = False,
    ratio_bound: float | None = None,
):
    """One QuotientAdam step on a bundle group at ``frame`` (``bundle.at(point)``), out of
    place (the algorithm of ``QuotientAdam``). Returns ``(new_point, new_state, new_frame)``,
    the last the frame of the new point, which the next step reuses. ``ratio_bound``:
    ``RATIO_BOUND`` unless given."""
    frame, grad, (exp_avg,) = begin_step(
        frame, grad, (state["exp_avg"],), maximize=maximize, dress=dress
    )
    step = state["step"] + 1
    # one factorisation: the Riemannian gradient (horizontal already) and its mean squares
    rgrad, grad_square = frame.gradient_and_moments(grad)
    exp_avg = lerp(exp_avg, rgrad, 1 - beta1)
    exp_avg_sq = lerp(state["exp_avg_sq"], grad_square, 1 - beta2)  # β₂v + (1 − β₂)s, one pass
    bc1, bc2_sqrt = bias_corrections(step, beta1, beta2, exp_avg[0].dtype)
    # m̂ / (max(√v̂, rms(m̂)/c) + ε), both bias corrections folded into the per-slice denominator
    bound = RATIO_BOUND if ratio_bound is None else ratio_bound
    # in place on the roots (this step's own): half the temporaries; roots first, so that no
    # square of a large moment is formed (float32 overflows at condition 1e8)
    first = frame.mean_square(exp_avg)
    direction = tuple(
        _ratio(m, v, f, bc1, bc2_sqrt, bound, eps) for m, v, f in zip(exp_avg, exp_avg_sq, first)
    )
    new_point = frame.descend(direction, lr, weight_decay)  # projected, bounded, retracted
    new_frame = frame.moved(new_point)
    exp_avg = new_frame.horizontal(exp_avg)  # transport: projection at the new point
    return new_point, AdamState(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq), new_frame


def _ratio(m, v, f, bc1, bc2_sqrt, bound: float, eps: float) -> torch.Tensor:
    """m / ((max(√v / √(1 − β₂ᵗ), √f / ((1 − β₁ᵗ)·bound)) + ε)·(1 − β₁ᵗ)) with one new tensor
    for the denominator (written into where the moments are slices of one element each, as a
    ``PositiveRescaling``'s are: the quotient then needs no other)."""
    root = v.sqrt().div_(bc2_sqrt)
    root = torch.maximum(root, f.sqrt().div_(bc1 * bound), out=root).add_(eps).mul_(bc1)
    return torch.div(m, root, out=root) if root.shape == m.shape else m / root


# ---- the plain update (torch.optim.AdamW) --------------------------------------------------


def adam_plain_updates(
    params: list,
    grads: list,
    states: list[AdamState],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> tuple[list, list[AdamState]]:
    """``torch.optim.AdamW``'s update of every tensor of a group with torch's multi-tensor
    kernels, out of place: (new params, new states)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    steps, exp_avg, exp_avg_sq = adam_moments(states, grads, beta1, beta2)
    update = adam_step(steps, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    new_params = torch._foreach_mul(params, 1 - lr * weight_decay)
    torch._foreach_sub_(new_params, update)
    new_states = [
        AdamState(step=step, exp_avg=m, exp_avg_sq=v)
        for step, m, v in zip(steps, exp_avg, exp_avg_sq)
    ]
    return new_params, new_states


#: elements of a group whose moments are computed together (``adam_plain_in_place``): the
#: transient memory of a plain step, beyond the new parameters it holds, is about three times
#: this (or the largest tensor) in the parameters' dtype
CHUNK_ELEMENTS = 1 << 22

#: groups with more elements than this do not hold their new parameters until the commit
#: (``adam_plain_in_place``)
HOLD_ELEMENTS = 1 << 24


def _chunks(params: list):
    """Index lists of consecutive tensors with at most ``CHUNK_ELEMENTS`` elements together
    (a larger tensor alone)."""
    chunk, size = [], 0
    for i, p in enumerate(params):
        if chunk and size + p.numel() > CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += p.numel()
    if chunk:
        yield chunk


def adam_plain_in_place(
    params: list,
    grads: list,
    states: list[AdamState],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
):
    """``adam_plain_updates`` as a plan: returns ``(new_params, checks, commit)``; ``checks``
    are the sums of the new second moments (a value that overflows would make the step zero
    instead of reaching the parameters, so the guard checks it) and ``commit(ok)`` writes the
    new state (where ``ok`` is a device flag, only if it is set). The update is computed chunk
    by chunk (``CHUNK_ELEMENTS``).

    A group of at most ``HOLD_ELEMENTS`` elements holds its new parameters and moments until
    the commit. A larger group holds neither: its moments are dropped once they have formed the
    new parameters, whose sums join ``checks``, and ``commit`` advances the moments in place and
    forms the new parameters again from them — the same operations, hence the same values, at
    the price of computing the update twice — so that the transient memory of a plain step
    stays near ``CHUNK_ELEMENTS`` whatever the model's size (torch's AdamW holds one tensor's
    denominator). New parameters equal ``adam_plain_updates``', bit for bit, either way."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    deferred = deferred_adamw(params, grads, states, maximize=maximize, **hyper)
    if deferred is not None:
        return deferred
    signed = torch._foreach_neg(grads) if maximize else list(grads)
    hold = sum(p.numel() for p in params) <= HOLD_ELEMENTS
    new_params: list[torch.Tensor] = []
    checks: list[torch.Tensor] = []
    decay = 1 - lr * weight_decay

    def moments(chunk, in_place: bool = False):
        gs = [signed[i] for i in chunk]
        return adam_moments([states[i] for i in chunk], gs, beta1, beta2, in_place)

    def update(steps, exp_avg, exp_avg_sq):
        return adam_step(steps, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps)

    kept = []  # a held group's new moments, committed as they are
    for chunk in _chunks(params):
        steps, exp_avg, exp_avg_sq = moments(chunk)
        checks.extend(v.sum() for v in exp_avg_sq)
        step = update(steps, exp_avg, exp_avg_sq)
        new = torch._foreach_mul([params[i] for i in chunk], decay)
        torch._foreach_sub_(new, step)
        if hold:
            new_params.extend(new)
            kept.extend(zip(chunk, steps, exp_avg, exp_avg_sq))
        else:
            checks.extend(p.sum() for p in new)

    def commit(ok) -> None:
        for i, t, m, v in kept:
            new = {"step": t, "exp_avg": m, "exp_avg_sq": v}
            if ok is not None:  # a device flag: masked
                new = {k: torch.where(ok, x, states[i][k]) for k, x in new.items()}
            states[i].update(new)
        if hold:
            return
        for chunk in _chunks(params):
            if ok is None:
                steps, exp_avg, exp_avg_sq = moments(chunk, in_place=True)
                step = update(steps, exp_avg, exp_avg_sq)
                ps = [params[i] for i in chunk]
                torch._foreach_mul_(ps, decay)
                torch._foreach_sub_(ps, step)
                continue
            for i in chunk:  # a device flag: masked, tensor by tensor
                (t,), (m,), (v,) = moments([i])
                (s,) = update([t], [m], [v])
                new = params[i].mul(decay).sub_(s)
                params[i].copy_(torch.where(ok, new, params[i]))
                state = states[i]
                for key, value in (("exp_avg", m), ("exp_avg_sq", v), ("step", t)):
                    state[key].copy_(torch.where(ok, value, state[key]))

    return new_params, checks, commit


# ---- the optimiser ----------------------------------------------------------------------------


class QuotientAdam(QuotientOptimizer):
    r"""Adam with decoupled weight decay on quotient manifolds (a ``torch.optim.Optimizer``).

    Groups without a ``"bundle"`` are ``torch.optim.AdamW``: on the CPU (float32, float64) its
    own update, bit for bit, run in place once the step is known finite; elsewhere the same
    update computed out of place (equal to round-off). A bundle group with point
    p, Euclidean gradient ∇f and state (m, v) takes the step (``adam_bundle_update``)::

        every dress_every steps:  p ← p·u(p),  m ← m·u(p),  ∇f ← act_dual(∇f, u(p))
        ξ = grad_metric f(p)                               # horizontal for an invariant loss
        m ← β₁ m + (1 − β₁) ξ;   v ← β₂ v + (1 − β₂) slice_mean_square(p, ξ)
        d = m̂ / (max(√v̂, rms(m̂) / c) + ε)                # per slice; c = RATIO_BOUND
        p ← retract(scale_invariants(p, 1 − lr·wd), −limit_step(lr·P_H d));  m ← P_H m at p

    Second moments are per slice that no symmetry mixes (a head factor's rows, a model-space
    row), so they pick no basis; weight decay scales the invariants (each head's W_q W_kᵀ by
    1 − lr·wd, half AdamW's decay of the product: tune wd per optimiser). Runs from p and p·g
    stay on one orbit under a G-invariant metric, and under any metric when dressing before
    the first step (the default); a damped invariant metric is equivariant for orthogonal g
    and to O(δ) otherwise. Why: docs/theory/optimisers.md.

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

    References: Kingma & Ba 2015 (Adam); Loshchilov & Hutter 2019 (AdamW); Bécigneul & Ganea
    2019 (Riemannian adaptive methods); Absil, Mahony & Sepulchre 2008, ch. 3–4.
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
        options = dict(foreach=foreach, fused=fused, capturable=capturable)
        rules.reject_unsupported("QuotientAdam", dict(options, differentiable=differentiable))
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            dress_every=dress_every,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _init_state(self, group: dict, point: tuple) -> AdamState:
        bundle = group.get("bundle")
        if bundle is None:
            (param,) = point
            zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
            return AdamState(step=self._zero_step(param), exp_avg=zeros, exp_avg_sq=zeros.clone())
        zeros = tuple(torch.zeros_like(t) for t in point)
        second = tuple(torch.zeros_like(s) for s in bundle.slice_mean_square(point, zeros))
        return AdamState(step=self._zero_step(point[0]), exp_avg=zeros, exp_avg_sq=second)

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
        names = ("lr", "eps", "weight_decay", "maximize")
        return dict({k: group[k] for k in names}, beta1=beta1, beta2=beta2)

    _bundle_update = staticmethod(adam_bundle_update)
    _plain_update = staticmethod(adam_plain_updates)
    _plain_in_place = staticmethod(adam_plain_in_place)
    _checked_state = ("exp_avg_sq",)  # an infinite v would zero the step instead of spreading
