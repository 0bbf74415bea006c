r"""BaLoRA: AdamW on LoRA adapters, each adapter moved to its balanced representative after
every step.

Castin, Nadjahi, Ablin, Peyré, "Balanced LoRA: Removing Parameter Invariance to Accelerate
Convergence" (ICML 2026, arXiv:2605.31484; authors' code ``vcastin/balora``, the projection of
``callbacks.py`` applied after every optimiser step). After AdamW's step each adapter
ΔW = B A (B (d_out, r), A (r, d_in)) is replaced by (B u, u⁻¹A) with BᵀB = AAᵀ = Σ diagonal
(Σ the singular values of B A): the same ΔW, on the balanced section. AdamW's state is left
as it is (not transported).

The projection is the dressing of quotopt's GL(r) bundle of the pair (``manifolds.HeadOV``
with one head per adapter, stacked by shape: ``Bundle.redress``), which is this balanced,
diagonal representative with a fixed sign per column (the largest entry of each column of B
positive; the reference leaves the signs to its SVD routine). Where the reference differs: an
adapter whose factors are rank-deficient to working precision (B = 0 before the first step)
is left where it is (the reference's projection would zero the directions B A lacks).
"""

from __future__ import annotations

import torch
from torch import nn

import manifolds as M

from ...optim.lora_shell import adapter_groups

__all__ = ["BaLoRA", "balora"]


class BaLoRA(torch.optim.AdamW):
    """``torch.optim.AdamW`` on the trainable adapters of ``model``, then every adapter moved
    to its balanced representative (module docstring). ``balance_gap()`` reports
    max ‖BᵀB − AAᵀ‖ / ‖BᵀB‖ over the adapters."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        groups = adapter_groups(model, "BaLoRA")
        super().__init__(groups, lr, betas, eps, weight_decay)
        for group in self.param_groups:
            b, a = group["params"][0], group["params"][1]
            (d_out, r), d_in = b.shape, a.shape[1]
            group["bundle_shape"] = (d_out, r, d_in)

    @staticmethod
    def _bundle(group: dict) -> M.HeadOV:
        d_out, r, d_in = group["bundle_shape"]
        return M.HeadOV(len(group["params"]) // 2, d_out, r, factor_rows=(d_out, d_in))

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        with M.unchecked():
            for group in self.param_groups:
                params = group["params"]
                point = (torch.stack(params[0::2]), torch.stack(params[1::2]))
                zeros = tuple(torch.zeros_like(t) for t in point)
                (b, a), _, _ = self._bundle(group).redress(point, zeros, ())
                for i, (pb, pa) in enumerate(zip(params[0::2], params[1::2])):
                    pb.copy_(b[i])
                    pa.copy_(a[i])
        return loss

    @torch.no_grad()
    def balance_gap(self) -> float:
        gaps = []
        for group in self.param_groups:
            for b, a in zip(group["params"][0::2], group["params"][1::2]):
                q = b.mT @ b
                gaps.append(
                    torch.linalg.norm(q - a @ a.mT) / torch.linalg.norm(q).clamp(min=1e-300)
                )
        return float(torch.stack(gaps).max())


def balora(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> BaLoRA:
    """``BaLoRA`` with the baselines' factory signature (``quotopt.lab.baselines``)."""
    return BaLoRA(model, lr, betas, weight_decay=weight_decay)
