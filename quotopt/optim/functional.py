r"""Pure update functions: one optimiser step on one parameter group, out of place.

Each function takes the current point (a tuple of tensors), its Euclidean gradient and the
group's state (a dict of tensors and tuples of tensors) and returns ``(new_point, new_state)``
without touching its inputs, so the caller can decide whether to commit the step (the
non-finite guard) and the functions are testable alone.

Bundle groups follow one pipeline (Absil, Mahony & Sepulchre 2008, ch. 3-4; Bécigneul & Ganea
2019 for the adaptive part):

    [re-dressing] → Euclidean gradient → Riemannian gradient (metric) → horizontal projection
    → moments → direction → decay on the invariants → retraction → transport of the moment.

Every operation commutes with the group action when the metric is G-invariant, so the iterates
from p and from p·g lie on the same orbits (gauge equivariance). Adam's second moments are the
bundle's ``moment_sq``: gauge-invariant mean squares per slice that no symmetry mixes (per row
of a head factor, per model-space row of an O(d) tensor), never per coordinate — a
per-coordinate second moment picks a basis the symmetry rotates. The preconditioned direction is
projected back onto the horizontal space.

Re-dressing happens at the start of a step: the point moves along its orbit by u = dressing(p),
the first moment is pushed forward by the same element (the action is linear), the Euclidean
gradient is carried as a covector (``act_dual``) and the invariant second moments are unchanged.
Dressing before the first step makes the whole run gauge-equivariant even under a metric that
is not G-invariant: runs started anywhere on an orbit continue from one representative.

Plain groups reproduce ``torch.optim.AdamW`` / ``torch.optim.SGD`` exactly.
"""

from __future__ import annotations

import torch

from manifolds import Bundle

__all__ = [
    "adam_bundle_update",
    "adam_plain_update",
    "sgd_bundle_update",
    "sgd_plain_update",
    "redress",
]

Tensors = tuple[torch.Tensor, ...]


def _axpy(a: Tensors, b: Tensors, alpha) -> Tensors:
    """a + alpha·b, tuple-wise."""
    return tuple(x + alpha * y for x, y in zip(a, b))


def _lerp(a: Tensors, b: Tensors, weight: float) -> Tensors:
    return tuple(torch.lerp(x, y, weight) for x, y in zip(a, b))


def _bias_corrections(step: torch.Tensor, beta1: float, beta2: float):
    return 1 - beta1**step, (1 - beta2**step).sqrt()


def redress(bundle: Bundle, point: Tensors, grad: Tensors, tangents: tuple[Tensors, ...]):
    """Move ``point`` to its dressed representative p·u; carry the Euclidean gradient (a
    covector) and the ``tangents`` (moments) with it."""
    u = bundle.dressing(point)
    moved = tuple(bundle.act(t, u) for t in tangents)
    return bundle.act(point, u), bundle.act_dual(grad, u), moved


# ---- Adam -------------------------------------------------------------------------------------


def adam_bundle_update(
    bundle: Bundle,
    point: Tensors,
    grad: Tensors,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    dress: bool = False,
):
    """One QuotientAdam step on a bundle group (see the module docstring)."""
    if maximize:
        grad = tuple(-g for g in grad)
    exp_avg = state["exp_avg"]
    if dress:
        point, grad, (exp_avg,) = redress(bundle, point, grad, (exp_avg,))
    step = state["step"] + 1
    rgrad = bundle.horizontal_gradient(point, grad)
    exp_avg = _lerp(exp_avg, rgrad, 1 - beta1)
    exp_avg_sq = tuple(
        beta2 * v + (1 - beta2) * s
        for v, s in zip(state["exp_avg_sq"], bundle.moment_sq(point, rgrad))
    )
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2)
    direction = tuple(
        (m / bc1) / ((v.sqrt() / bc2_sqrt) + eps) for m, v in zip(exp_avg, exp_avg_sq)
    )
    direction = bundle.project_horizontal(point, direction)
    base = bundle.decay(point, 1 - lr * weight_decay) if weight_decay else point
    new_point = bundle.retract(base, tuple(-lr * d for d in direction))
    exp_avg = bundle.transport(point, new_point, exp_avg)
    return new_point, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def adam_plain_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
):
    """``torch.optim.AdamW``'s update for one tensor, out of place."""
    if maximize:
        grad = -grad
    step = state["step"] + 1
    param = param * (1 - lr * weight_decay)
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2)
    denom = exp_avg_sq.sqrt() / bc2_sqrt + eps
    new_param = param - (lr / bc1) * exp_avg / denom
    return new_param, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


# ---- SGD --------------------------------------------------------------------------------------


def _momentum_buffer(buf, direction, step, momentum, dampening):
    """torch's rule: the first buffer is the gradient itself, then μ·buf + (1-τ)·grad.

    ``step`` is a tensor, so the first-step case is a ``where`` (no host synchronisation).
    """
    if isinstance(direction, tuple):
        return tuple(
            _momentum_buffer(b, d, step, momentum, dampening) for b, d in zip(buf, direction)
        )
    return torch.where(step == 0, direction, momentum * buf + (1 - dampening) * direction)


def sgd_bundle_update(
    bundle: Bundle,
    point: Tensors,
    grad: Tensors,
    state: dict,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
    dress: bool = False,
):
    """One QuotientSGD step on a bundle group. Weight decay is decoupled and acts on the
    invariants (``bundle.decay``), the only form that commutes with the group action."""
    if maximize:
        grad = tuple(-g for g in grad)
    buf = state.get("momentum_buffer")
    if dress:
        point, grad, moved = redress(bundle, point, grad, (buf,) if momentum else ())
        buf = moved[0] if momentum else None
    rgrad = bundle.horizontal_gradient(point, grad)
    new_state = {"step": state["step"] + 1}
    direction = rgrad
    if momentum:
        buf = _momentum_buffer(buf, rgrad, state["step"], momentum, dampening)
        direction = _axpy(rgrad, buf, momentum) if nesterov else buf
    base = bundle.decay(point, 1 - lr * weight_decay) if weight_decay else point
    new_point = bundle.retract(base, tuple(-lr * d for d in direction))
    if momentum:
        new_state["momentum_buffer"] = bundle.transport(point, new_point, buf)
    return new_point, new_state


def sgd_plain_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
):
    """``torch.optim.SGD``'s update for one tensor (coupled L2 decay), out of place."""
    if maximize:
        grad = -grad
    if weight_decay:
        grad = grad + weight_decay * param
    new_state = {"step": state["step"] + 1}
    if momentum:
        buf = _momentum_buffer(state["momentum_buffer"], grad, state["step"], momentum, dampening)
        grad = grad + momentum * buf if nesterov else buf
        new_state["momentum_buffer"] = buf
    return param - lr * grad, new_state
