"""Plain AdamW steps taken in place at the commit, where their result is known finite first.

A quotient optimiser computes its step out of place and commits it only if every new value is
finite (``quotopt.optim.guard``). For a plain AdamW group that means holding a model's worth of
new tensors until the commit — on the CPU more costly in page faults than the update itself.
Where the gradients, parameters and hyperparameters bound the result (``_can_defer``), nothing
is held: torch's own AdamW runs in place once every group's step has been checked. Theory:
docs/theory/optimisers.md#how-a-step-is-computed ("Memory").
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as torch_adamw

__all__ = ["deferred_adamw"]


def _bounds(dtype: torch.dtype) -> tuple[float, float]:
    """(gradient bound, parameter bound) of a deferred step in ``dtype``: |g| ≤ √max / 4 keeps
    g² and the second moment finite, |p| ≤ max / 4 leaves room for the update."""
    top = torch.finfo(dtype).max
    return top**0.5 / 4, top / 4


def _can_defer(params: list, grads: list, lr: float, eps: float) -> bool:
    """Whether a plain step may run in place at commit (``_deferred_adamw``), which needs its
    result to be finite before it is computed. That is decided here, on the CPU only (the
    answer is read on the host, which costs nothing there; a device flag would need a
    masked write, hence new tensors), in float32 or float64, when every gradient has
    ‖g‖₂ ≤ √max/4 and every parameter ‖p‖₂ ≤ max/4 — so every |gᵢ| and |pᵢ| is below those
    bounds, g² and the second moment stay finite — and the hyperparameters bound the update
    (at most lr·max|g|/ε per coordinate) below a quarter of the dtype's largest value. With
    finite moments (every earlier step and every loaded state is checked) the new moments
    and parameters are then finite. Otherwise the step is computed out of place and checked
    like a bundle's. Two fast reductions per tensor (the 2-norm, vectorised; an ∞-norm is
    not, on the CPU)."""
    dtypes = {p.dtype for p in params}
    if any(p.device.type != "cpu" for p in params) or not dtypes <= {torch.float32, torch.float64}:
        return False
    if not (eps > 0 and math.isfinite(lr)):
        return False
    flags = []
    for dtype in dtypes:
        g_bound, p_bound = _bounds(dtype)
        if abs(lr) * g_bound / eps > p_bound:
            return False
        same = [i for i, p in enumerate(params) if p.dtype == dtype]
        g_norm = torch.stack(torch._foreach_norm([grads[i] for i in same])).amax()
        p_norm = torch.stack(torch._foreach_norm([params[i] for i in same])).amax()
        flags.append((g_norm <= g_bound) & (p_norm <= p_bound))  # NaN, inf: False
    return bool(torch.stack(flags).all())


def deferred_adamw(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize):
    """The plan ``(new_params, checks, commit)`` of a plain AdamW group that steps in place at
    commit, or None where ``_can_defer`` cannot tell that its result is finite: torch's own
    AdamW update (``torch.optim.AdamW``'s values bit for bit) runs once every group's step
    has been checked, so nothing new is allocated and held in between — on the CPU, holding
    a model's worth of new tensors costs more in page faults than the update itself."""
    if not params or not _can_defer(params, grads, lr, eps):
        return None

    def commit(flag) -> None:
        if flag is not None:  # never: deferred steps are taken where the flag is read
            raise RuntimeError("a deferred AdamW step needs a host-read commit")
        torch_adamw(
            params,
            list(grads),
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=False,  # one tensor's denominator at a time (torch's CPU default)
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
        )

    return [], [], commit
