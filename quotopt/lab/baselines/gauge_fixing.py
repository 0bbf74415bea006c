r"""Gauge fixing of each head's GL(r): the top r×r blocks of W_Q[h] and W_V[h] held at I.

Per head, (W_Q, W_K) ∈ ℝ^{d×r} × ℝ^{d×r} carries the action (W_Q g, W_K g⁻ᵀ) of g ∈ GL(r), and
(W_V, W_O) ∈ ℝ^{d×r} × ℝ^{r×d} the action (W_V g, g⁻¹ W_O); the head computes with W_Q W_Kᵀ and
W_V W_O only. The slice {W_Q[:r] = I_r} meets every orbit whose top block W_Q[:r] is invertible
exactly once: (W_Q g)[:r] = W_Q[:r] g = I forces g = W_Q[:r]⁻¹. So (W_Q[r:], W_K) are
coordinates on that open, dense part of the quotient, 2dr − r² of them, the dimension of the
rank-r d×d matrices W_Q W_Kᵀ; likewise (W_V[r:], W_O) with W_V[:r] = I. Orbits with a singular
top block lie outside the chart and cannot be reached from it.

This is the per-head form of the query-weight elimination of Karbevski–Mijoski 2025 ("On the
necessity of the Query, Key and Value weight triplet", arXiv:2510.23912), who fix the whole
query projection to I with GL(d) acting on the residual input and fold the change into the
previous layer. Here only the heads' own GL(r) is used, so the model's function is unchanged
and only an r×r block per head and pair is fixed.
"""

from __future__ import annotations

import torch
from torch import nn

from manifolds.linalg import solve_left, work_dtype

from ._edited_adamw import EditedAdamW
from ._heads import factored_attention

__all__ = ["GaugeFixedAdamW", "fix_head_gauge", "gauge_fixed_adamw"]


def _top_block(w: torch.Tensor) -> torch.Tensor:
    return w[:, : w.shape[-1], :]  # (H, r, r) view of (H, d, r)


def _write_identity(w: torch.Tensor) -> None:
    block = _top_block(w)
    block.zero_()
    block.diagonal(dim1=-2, dim2=-1).fill_(1.0)


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return work_dtype(w.dtype)  # no half-precision LU


def _check_top_blocks(label: str, w: torch.Tensor, max_condition: float) -> None:
    _, d, r = w.shape
    if d < r:
        raise ValueError(f"{label}: shape {tuple(w.shape)} has d < r, so no r×r block to fix")
    condition = torch.linalg.cond(_top_block(w.detach()).to(_work_dtype(w)))  # (H,)
    bad = ~(condition <= max_condition)  # NaN counts as singular
    if bad.any():
        h = int(bad.nonzero()[0])
        raise ValueError(
            f"{label} head {h}: top {r}×{r} block has condition number "
            f"{float(condition[h]):.3g} > {max_condition:g}; this point is outside the gauge "
            "W[:r] = I"
        )


@torch.no_grad()
def fix_head_gauge(model: nn.Module, max_condition: float = 1e8) -> None:
    """Move every head of ``model`` to the gauge W_Q[:r] = W_V[:r] = I, in place.

    Applies g = W_Q[:r]⁻¹ to (W_Q, W_K) and g' = W_V[:r]⁻¹ to (W_V, W_O), batched over heads:
    W_Q ← W_Q g, W_K ← W_K W_Q[:r]ᵀ (= W_K g⁻ᵀ), W_V ← W_V g', W_O ← W_V[:r] W_O (= g'⁻¹ W_O);
    the top blocks are then written as exactly I. The model's function does not change.

    Raises ``ValueError`` naming the module and head if a top block's condition number exceeds
    ``max_condition``; every block is checked before anything is written.
    """
    modules = factored_attention(model)
    for name, module in modules:
        _check_top_blocks(f"{name}.wq", module.wq, max_condition)
        _check_top_blocks(f"{name}.wv", module.wv, max_condition)
    for _, module in modules:
        wq, wk, wv, wo = (
            t.to(_work_dtype(t)) for t in (module.wq, module.wk, module.wv, module.wo)
        )
        # Copies: in float64 these would be views of the parameters overwritten below.
        a, b = _top_block(wq).clone(), _top_block(wv).clone()  # (H, r, r) each
        module.wq.copy_(solve_left(a.mT, wq.mT).mT)  # W_Q a⁻¹ = (a⁻ᵀ W_Qᵀ)ᵀ
        module.wk.copy_(wk @ a.mT)
        module.wv.copy_(solve_left(b.mT, wv.mT).mT)  # W_V b⁻¹
        module.wo.copy_(b @ wo)
        _write_identity(module.wq)
        _write_identity(module.wv)


class GaugeFixedAdamW(EditedAdamW):
    """AdamW in the gauge-fixed coordinates of ``fix_head_gauge`` (see the module docstring).

    In a param group with ``identity_block=True`` every parameter W has shape (H, d, r), d ≥ r,
    and its top block W[:, :r, :] is held at I: the block's gradient is zeroed in place before
    the update (AdamW's moments stay 0 there) and I is written back after it (so decoupled
    weight decay cannot shrink it). The free coordinates are W[:, r:, :]; other groups are plain
    AdamW. The blocks must already be I (call ``fix_head_gauge`` first), else ``ValueError``.

    The arguments are those of ``torch.optim.AdamW`` (``params``, ``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``amsgrad``, ``maximize``, ``foreach``, ``fused``).
    """

    group_defaults = {"identity_block": False}

    def _check_group(self, group: dict) -> None:
        if not group["identity_block"]:
            return
        for p in group["params"]:
            if p.dim() != 3 or p.shape[1] < p.shape[2]:
                raise ValueError(
                    f"identity_block needs parameters of shape (H, d, r) with d >= r, "
                    f"got {tuple(p.shape)}"
                )
            eye = torch.eye(p.shape[2], dtype=p.dtype, device=p.device)
            if not torch.equal(_top_block(p.detach()), eye.expand_as(_top_block(p))):
                raise ValueError(
                    "identity_block parameters must have top blocks equal to I; "
                    "call fix_head_gauge(model) first"
                )

    def _fixed(self):
        return (p for g in self.param_groups if g["identity_block"] for p in g["params"])

    def _edit_gradients(self):
        for p in self._fixed():
            if p.grad is not None:
                _top_block(p.grad).zero_()

    def _edit_parameters(self, token) -> None:
        del token
        for p in self._fixed():
            _write_identity(p)


def gauge_fixed_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> GaugeFixedAdamW:
    """``fix_head_gauge(model)`` (in place), then ``GaugeFixedAdamW`` with every head's W_Q
    and W_V in an ``identity_block`` group and the other parameters plain."""
    fix_head_gauge(model)
    fixed = [w for _, m in factored_attention(model) for w in (m.wq, m.wv)]
    ids = {id(p) for p in fixed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": fixed, "identity_block": True}, {"params": rest}]
    return GaugeFixedAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
