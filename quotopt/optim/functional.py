r"""Pure update functions: one optimiser step on one parameter group, out of place.

Each bundle update takes the frame handle of the current point (``bundle.at(point)``,
``manifolds.frame.Frame``), its Euclidean gradient and the group's state (a dict of tensors and
tuples of tensors) and returns ``(new_point, new_state, new_frame)`` without touching its
inputs, so the caller can decide whether to commit the step (the non-finite guard) and the
functions are testable alone. They reach the geometry through the frame only.

Bundle groups follow one pipeline (Absil, Mahony & Sepulchre 2008, ch. 3-4; Bécigneul & Ganea
2019 for the adaptive part):

    [re-dressing] → Euclidean gradient → Riemannian gradient (metric) and its moments
    → direction → projected, bounded, decayed, retracted (``Frame.descend``) → the new
    point's frame (``Frame.moved``) → transport of the moment (projection there).

One factorisation of the point serves the Riemannian gradient, the second moments and the
projection of the direction; the factorisation of the new point serves the transport and the
next step. Re-dressing needs no second one: the head bundles write the dressed (balanced)
point's frame down (``Frame.redressed``), so a step that dresses still factorises once per
head.

The Riemannian gradient of a G-invariant loss is horizontal already (g(grad f, V) =
df(V) = 0 on vertical V), so it is not projected; the preconditioned direction and the
transported moment are not horizontal and are. ``bundle.limit_step`` bounds how far one step
moves the invariants (the invariant metric's trust rule).

Every operation commutes with the group action when the metric is G-invariant, so the iterates
from p and from p·g lie on the same orbits (gauge equivariance). Adam's second moments are the
bundle's ``slice_mean_square``: gauge-invariant mean squares per slice that no symmetry mixes
(per row of a head factor, per model-space row of an O(d) tensor), never per coordinate — a
per-coordinate second moment picks a basis the symmetry rotates. A slice's normalised first
moment is capped at ``RATIO_BOUND`` in the metric's RMS (the denominator is at least
rms(m̂)/``RATIO_BOUND``). Under a fixed metric and gradients of steady size m̂/√v̂ ≤ 1 and the
cap does not bind; where the metric changes faster than v̂ (β₂ close to 1) follows it, the
transported m̂ outgrows √v̂ and the steps would compound. The cap bounds every step, hence the
trajectory, by gauge-invariant quantities. The preconditioned direction is projected onto the
horizontal space.

Re-dressing happens at the start of a step: the point moves along its orbit by u = dressing(p),
the first moment is pushed forward by the same element (the action is linear), the Euclidean
gradient is carried as a covector (``act_dual``) and the invariant second moments are unchanged.
Dressing before the first step makes the whole run gauge-equivariant even under a metric that
is not G-invariant: runs started anywhere on an orbit continue from one representative.

Plain groups reproduce ``torch.optim.AdamW`` / ``torch.optim.SGD`` exactly
(``quotopt.optim.plain``).
"""

from __future__ import annotations

import torch

from manifolds.frame import Frame

__all__ = ["RATIO_BOUND", "adam_bundle_update", "sgd_bundle_update", "begin_step"]

Tensors = tuple[torch.Tensor, ...]

#: Adam's bound on a slice's normalised first moment: the RMS of m̂/√v̂ per slice, measured in
#: the metric, never exceeds it (``adam_bundle_update``)
RATIO_BOUND = 2.0


def _axpy(a: Tensors, b: Tensors, alpha) -> Tensors:
    """a + alpha·b, tuple-wise."""
    return tuple(x + alpha * y for x, y in zip(a, b))


def _lerp(a: Tensors, b: Tensors, weight: float) -> Tensors:
    return tuple(torch.lerp(x, y, weight) for x, y in zip(a, b))


def _bias_corrections(step: torch.Tensor, beta1: float, beta2: float, dtype: torch.dtype):
    """1 − β₁ᵗ and √(1 − β₂ᵗ) from the float64 step counter. A counter per head (stacked
    groups, ``quotopt.optim.stacking``) is cast to the moments' dtype, which a 0-d counter
    needs not be: it does not promote the tensors it multiplies."""
    bc1, bc2_sqrt = 1 - beta1**step, (1 - beta2**step).sqrt()
    if step.dim():
        return bc1.to(dtype), bc2_sqrt.to(dtype)
    return bc1, bc2_sqrt


def begin_step(frame: Frame, grad, moments: tuple, *, maximize, dress):
    """The start every bundle update shares: the gradient's sign and the re-dressing (carrying
    the ``moments``, tangent vectors at the point). Returns ``(frame, grad, moments)``, the
    frame the step starts from."""
    if maximize:
        grad = tuple(-g for g in grad)
    if dress:
        return frame.redressed(grad, moments)
    return frame, grad, moments


# ---- Adam -------------------------------------------------------------------------------------


def adam_bundle_update(
    frame: Frame,
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
    ratio_bound: float | None = None,
):
    """One QuotientAdam step on a bundle group at ``frame`` (``bundle.at(point)``; see the
    module docstring). Returns ``(new_point, new_state, new_frame)``, the last the frame of the
    new point, which the next step reuses."""
    frame, grad, (exp_avg,) = begin_step(
        frame, grad, (state["exp_avg"],), maximize=maximize, dress=dress
    )
    step = state["step"] + 1
    # the Riemannian gradient of a G-invariant loss is horizontal: no projection needed
    rgrad, grad_square = frame.gradient_and_moments(grad)
    exp_avg = _lerp(exp_avg, rgrad, 1 - beta1)
    exp_avg_sq = tuple(
        beta2 * v + (1 - beta2) * s for v, s in zip(state["exp_avg_sq"], grad_square)
    )
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2, exp_avg[0].dtype)
    # m̂ / (max(√v̂, rms(m̂)/c) + ε), both bias corrections folded into the per-slice denominator
    bound = RATIO_BOUND if ratio_bound is None else ratio_bound
    first = frame.mean_square(exp_avg)
    direction = tuple(
        m / ((torch.maximum(v.sqrt() / bc2_sqrt, f.sqrt() / (bc1 * bound)) + eps) * bc1)
        for m, v, f in zip(exp_avg, exp_avg_sq, first)
    )
    new_point = frame.descend(direction, lr, weight_decay)  # projected, bounded, retracted
    new_frame = frame.moved(new_point)
    exp_avg = new_frame.horizontal(exp_avg)  # transport: projection at the new point
    return new_point, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, new_frame


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
    frame: Frame,
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
    """One QuotientSGD step on a bundle group at ``frame``. Weight decay is decoupled and acts
    on the invariants (``bundle.scale_invariants``), the only form that commutes with the group
    action. Returns ``(new_point, new_state, new_frame)`` as ``adam_bundle_update``."""
    moments = (state["momentum_buffer"],) if momentum else ()
    frame, grad, moments = begin_step(frame, grad, moments, maximize=maximize, dress=dress)
    buf = moments[0] if momentum else None
    rgrad = frame.riemannian_gradient(grad)  # horizontal for invariant losses
    new_state = {"step": state["step"] + 1}
    direction = rgrad
    if momentum:
        buf = _momentum_buffer(buf, rgrad, state["step"], momentum, dampening)
        direction = _axpy(rgrad, buf, momentum) if nesterov else buf
    # the momentum is horizontal (transported), the gradient too: no projection
    new_point = frame.descend(direction, lr, weight_decay, project=False)
    new_frame = frame.moved(new_point)
    if momentum:
        new_state["momentum_buffer"] = new_frame.horizontal(buf)
    return new_point, new_state, new_frame
