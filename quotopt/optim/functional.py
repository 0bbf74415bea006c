r"""Pure update functions: one optimiser step on one parameter group, out of place.

Each function takes the current point (a tuple of tensors), its Euclidean gradient and the
group's state (a dict of tensors and tuples of tensors) and returns ``(new_point, new_state)``
without touching its inputs, so the caller can decide whether to commit the step (the
non-finite guard) and the functions are testable alone.

Bundle groups follow one pipeline (Absil, Mahony & Sepulchre 2008, ch. 3-4; Bécigneul & Ganea
2019 for the adaptive part):

    [re-dressing] → factorise → Euclidean gradient → Riemannian gradient (metric) → moments
    → direction (projected) → bound → decay on the invariants → retraction → factorise
    → transport of the moment.

One factorisation of the point (``bundle.factorise``: per head the eigendecompositions of the
two factor Grams) serves the Riemannian gradient, the second moments and the projection of the
direction; the factorisation of the new point serves the transport and is returned for the next
step. Re-dressing needs no second one: the head bundles write the dressed (balanced) point's
frame down (``Bundle.redress``), so a step that dresses still factorises once per head.

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

from manifolds import Bundle

__all__ = [
    "RATIO_BOUND",
    "adam_bundle_update",
    "sgd_bundle_update",
    "redress",
    "begin_step",
    "descend",
]

Tensors = tuple[torch.Tensor, ...]

#: Adam's bound on a slice's normalised first moment: the RMS of m̂/√v̂ per slice, measured in
#: the metric, never exceeds it (``adam_bundle_update``)
RATIO_BOUND = 2.0


def _axpy(a: Tensors, b: Tensors, alpha) -> Tensors:
    """a + alpha·b, tuple-wise."""
    return tuple(x + alpha * y for x, y in zip(a, b))


def _lerp(a: Tensors, b: Tensors, weight: float) -> Tensors:
    return tuple(torch.lerp(x, y, weight) for x, y in zip(a, b))


def _bias_corrections(step: torch.Tensor, beta1: float, beta2: float):
    return 1 - beta1**step, (1 - beta2**step).sqrt()


def redress(bundle: Bundle, point: Tensors, grad: Tensors, tangents: tuple, frame=None):
    """Move ``point`` to its dressed representative p·u; carry the Euclidean gradient (a
    covector) and the ``tangents`` (moments) with it (``Bundle.redress``). Parts of the point
    where the dressing is undefined (rank-deficient heads) stay where they are (u = identity).
    ``frame``: the point's factorisation, if known. Returns ``(point, grad, tangents, frame)``,
    the last the dressed point's frame."""
    return bundle.redress(point, grad, tangents, frame)


def begin_step(bundle: Bundle, point, grad, moments: tuple, *, maximize, dress, frame):
    """The start every bundle update shares: the gradient's sign, the re-dressing (carrying
    the ``moments``, tangent vectors at the point) and the frame of the point the step starts
    from. Returns ``(point, grad, moments, frame)``."""
    if maximize:
        grad = tuple(-g for g in grad)
    if dress:
        return redress(bundle, point, grad, moments, frame)
    return point, grad, moments, bundle.factorise(point) if frame is None else frame


def descend(bundle: Bundle, point: Tensors, frame, direction: Tensors, lr: float, weight_decay):
    """The new point: decay on the invariants, then the bounded step -lr·direction (the bound
    is even in the step, so it is applied to -lr·direction directly)."""
    step = bundle.limit_step(point, tuple(d * -lr for d in direction), frame)
    base = bundle.scale_invariants(point, 1 - lr * weight_decay) if weight_decay else point
    return bundle.retract(base, step)


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
    frame=None,
    ratio_bound: float | None = None,
):
    """One QuotientAdam step on a bundle group (see the module docstring).

    ``frame`` is ``bundle.factorise(point)`` if the caller has it (it is recomputed otherwise
    and after re-dressing). Returns ``(new_point, new_state, new_frame)``, the last being the
    factorisation of the new point, which the next step reuses.
    """
    point, grad, (exp_avg,), frame = begin_step(
        bundle, point, grad, (state["exp_avg"],), maximize=maximize, dress=dress, frame=frame
    )
    step = state["step"] + 1
    # the Riemannian gradient of a G-invariant loss is horizontal: no projection needed
    rgrad = bundle.riemannian_gradient(point, grad, frame)
    exp_avg = _lerp(exp_avg, rgrad, 1 - beta1)
    exp_avg_sq = tuple(
        beta2 * v + (1 - beta2) * s
        for v, s in zip(state["exp_avg_sq"], bundle.slice_mean_square(point, rgrad, frame))
    )
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2)
    # m̂ / (max(√v̂, rms(m̂)/c) + ε), both bias corrections folded into the per-slice denominator
    bound = RATIO_BOUND if ratio_bound is None else ratio_bound
    first = bundle.slice_mean_square(point, exp_avg, frame)
    direction = tuple(
        m / ((torch.maximum(v.sqrt() / bc2_sqrt, f.sqrt() / (bc1 * bound)) + eps) * bc1)
        for m, v, f in zip(exp_avg, exp_avg_sq, first)
    )
    direction = bundle.project_horizontal(point, direction, frame)
    new_point = descend(bundle, point, frame, direction, lr, weight_decay)
    new_frame = bundle.factorise(new_point)
    exp_avg = bundle.transport(point, new_point, exp_avg, new_frame)
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
    frame=None,
):
    """One QuotientSGD step on a bundle group. Weight decay is decoupled and acts on the
    invariants (``bundle.scale_invariants``), the only form that commutes with the group
    action. ``frame`` and the returned triple as in ``adam_bundle_update``."""
    moments = (state["momentum_buffer"],) if momentum else ()
    point, grad, moments, frame = begin_step(
        bundle, point, grad, moments, maximize=maximize, dress=dress, frame=frame
    )
    buf = moments[0] if momentum else None
    rgrad = bundle.riemannian_gradient(point, grad, frame)  # horizontal for invariant losses
    new_state = {"step": state["step"] + 1}
    direction = rgrad
    if momentum:
        buf = _momentum_buffer(buf, rgrad, state["step"], momentum, dampening)
        direction = _axpy(rgrad, buf, momentum) if nesterov else buf
    new_point = descend(bundle, point, frame, direction, lr, weight_decay)
    new_frame = bundle.factorise(new_point)
    if momentum:
        new_state["momentum_buffer"] = bundle.transport(point, new_point, buf, new_frame)
    return new_point, new_state, new_frame
