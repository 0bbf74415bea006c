"""Moment arithmetic the optimisers share, out of place and without host synchronisation.

Tuple-wise interpolation for moments of bundle points (tuples of tensors), Adam's bias
corrections from a float64 step counter, torch's first-buffer rule for momentum, and the
multi-tensor (``_foreach``) kernels of ``torch.optim.AdamW``'s moments and step.
"""

from __future__ import annotations

import torch

__all__ = [
    "adam_moments",
    "adam_step",
    "axpy",
    "bias_corrections",
    "lerp",
    "momentum_buffer",
    "step_counter",
]

Tensors = tuple[torch.Tensor, ...]


def step_counter(reference: torch.Tensor) -> torch.Tensor:
    """A step counter at zero: a float64 scalar on ``reference``'s device (exact bias
    corrections, no host synchronisation)."""
    return torch.zeros((), dtype=torch.float64, device=reference.device)


def axpy(a: Tensors, b: Tensors, alpha) -> Tensors:
    """a + alpha·b, tuple-wise."""
    return tuple(x + alpha * y for x, y in zip(a, b))


def lerp(a: Tensors, b: Tensors, weight: float) -> Tensors:
    """a + weight·(b − a), tuple-wise (``torch.lerp``)."""
    return tuple(torch.lerp(x, y, weight) for x, y in zip(a, b))


def bias_corrections(step: torch.Tensor, beta1: float, beta2: float, dtype: torch.dtype):
    """1 − β₁ᵗ and √(1 − β₂ᵗ) from the float64 step counter. A counter per head (stacked
    groups, ``quotopt.optim.stacking``) is cast to the moments' dtype, which a 0-d counter
    needs not be: it does not promote the tensors it multiplies."""
    bc1, bc2_sqrt = 1 - beta1**step, (1 - beta2**step).sqrt()
    if step.dim():
        return bc1.to(dtype), bc2_sqrt.to(dtype)
    return bc1, bc2_sqrt


def momentum_buffer(buf, direction, step, momentum: float, dampening: float):
    """torch's rule: the first buffer is the direction itself, then μ·buf + (1 − τ)·direction.
    ``buf`` and ``direction`` are tensors or tuples of tensors; ``step`` (the steps taken) is a
    tensor, so the first-step case is a ``where`` (no host synchronisation)."""
    if isinstance(direction, tuple):
        return tuple(
            momentum_buffer(b, d, step, momentum, dampening) for b, d in zip(buf, direction)
        )
    return torch.where(step == 0, direction, momentum * buf + (1 - dampening) * direction)


def adam_moments(states: list[dict], grads: list, beta1: float, beta2: float, in_place=False):
    """AdamW's (step + 1, m, v) of ``states`` after ``grads``: new tensors, or the states'
    own advanced in place (``in_place``), by the same operations, hence the same values."""
    counters = [s["step"] for s in states]
    if in_place:
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        torch._foreach_add_(counters, 1)
        return counters, ms, vs
    steps = torch._foreach_add(counters, 1)
    ms = torch._foreach_lerp([s["exp_avg"] for s in states], grads, 1 - beta1)
    vs = torch._foreach_mul([s["exp_avg_sq"] for s in states], beta2)
    torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
    return steps, ms, vs


def adam_step(steps, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps) -> list:
    """lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε) in new buffers, the bias corrections in
    float64 as torch computes them with Python floats."""
    bias_1 = torch._foreach_pow(beta1, steps)  # β₁ᵗ, then 1 − β₁ᵗ
    torch._foreach_neg_(bias_1)
    torch._foreach_add_(bias_1, 1)
    bias_2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_2_sqrt)
    torch._foreach_add_(bias_2_sqrt, 1)
    torch._foreach_sqrt_(bias_2_sqrt)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, bias_2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avg, denom)
    torch._foreach_mul_(update, [lr / b for b in bias_1])  # lr / (1 − β₁ᵗ): torch's rounding
    return update
