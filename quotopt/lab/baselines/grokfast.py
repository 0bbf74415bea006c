"""Grokfast-EMA: AdamW on gradients whose slow (low-pass filtered) part is amplified."""

from __future__ import annotations

import torch
from torch import nn

from ._edited_adamw import EditedAdamW

__all__ = ["GrokfastAdamW", "grokfast"]


class GrokfastAdamW(EditedAdamW):
    r"""AdamW fed Grokfast-EMA filtered gradients.

    Lee, Kang, Kim, Lee & Kim, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients",
    arXiv:2405.20233. Per parameter, with g_t the gradient of step t:

        μ_1 = g_1,   μ_t = α μ_{t-1} + (1 − α) g_t      (an EMA: a low-pass filter of g)
        ĝ_t = g_t + λ μ_t                               (the slow component amplified)

    and AdamW takes ĝ_t as its gradient. The filter's gain is 1 + λ at frequency 0 and tends to
    1 at high frequency, so the slowly varying gradient direction, which the paper links to
    generalisation in grokking, dominates the update. μ_1 = g_1 follows the paper's code.

    μ lives in ``state[p]["grokfast_ema"]`` beside AdamW's moments, so ``state_dict()`` carries
    it. ``p.grad`` is left as the backward pass wrote it. A param group may set its own
    ``alpha`` and ``lamb``. The filter is elementwise, so a step never waits on the device.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused: as in
            ``torch.optim.AdamW``.
        alpha: EMA momentum α ∈ [0, 1] (paper: 0.98).
        lamb: amplification λ ≥ 0 of the filtered gradient (paper: 2.0).
    """

    group_defaults = {"alpha": 0.98, "lamb": 2.0}

    def _check_group(self, group: dict) -> None:
        if not 0.0 <= group["alpha"] <= 1.0:
            raise ValueError(f"Invalid alpha: {group['alpha']} (must lie in [0, 1])")
        if not group["lamb"] >= 0.0:
            raise ValueError(f"Invalid lamb: {group['lamb']} (must be >= 0)")

    def _edit_gradients(self):
        raw, fresh = [], []
        for group in self.param_groups:
            alpha, lamb = group["alpha"], group["lamb"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                ema = self.state[p].get("grokfast_ema")
                if ema is None:
                    ema = grad.clone(memory_format=torch.preserve_format)
                    fresh.append((p, ema))
                else:
                    ema.mul_(alpha).add_(grad, alpha=1 - alpha)
                raw.append((p, grad))
                p.grad = grad.add(ema, alpha=lamb)
        return raw, fresh

    def _edit_parameters(self, token) -> None:
        raw, fresh = token
        for p, grad in raw:
            p.grad = grad
        # AdamW initialises a parameter's state only while it is empty: store new EMAs after.
        for p, ema in fresh:
            self.state[p]["grokfast_ema"] = ema


def grokfast(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> GrokfastAdamW:
    """``GrokfastAdamW`` over all of ``model``'s parameters with the paper's α = 0.98, λ = 2."""
    return GrokfastAdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
