r"""QuotientMatrixAdam: Adam on LoRA's quotient with an r×r second moment per factor, in the
dressed (balanced) frame.

Per adapter ΔW = B A (B (d_out, r), A (r, d_in)): the pair is a point of ``manifolds.HeadOV``
with one head (action (B g, g⁻¹A)), adapters of one shape stacked (``quotopt.lora_step``).
One step, with V_B, V_A ∈ R^{r×r} and the momentum M = (M_B, M_A) kept in the gauge of the
current parameters:

1. dress: u = the dressing of (B, A) (``Bundle.dressing_or_identity``: the balanced
   representative B̄ᵀB̄ = ĀĀᵀ = Σ diagonal, sign-fixed); at the first step an adapter with
   B = 0 (LoRA's start, where no balanced representative exists) gets u = Rᵀ from Aᵀ = Q R,
   so that Ā = Qᵀ has orthonormal rows. (B̄, Ā) = (B u, u⁻¹A); the gradient as a covector
   ∇̄ = (∇_B u⁻ᵀ, uᵀ∇_A);
   V_B ← u⁻¹V_B u⁻ᵀ, V_A ← uᵀV_A u (Grams of gradients); M ← (M_B u, u⁻¹M_A) (a tangent);
2. V_B ← β̃₂V_B + (1 − β̃₂) ∇̄_Bᵀ∇̄_B / d_out, V_A ← β̃₂V_A + (1 − β̃₂) ∇̄_A∇̄_Aᵀ / d_in, with
   Adafactor's bias-corrected decay β̃ (as LoRA-RITE);
3. D = (∇̄_B V_B^{-1/2}, V_A^{-1/2} ∇̄_A) (ε outside the root); M ← β̃₁M + (1 − β̃₁)D;
4. (B, A) ← retract(scale_invariants(p̄, 1 − lr·wd), −lr·P_H(M)) (``Frame.descend`` under the
   Euclidean metric at p̄).

Equivariance: u(p·g) = g⁻¹u(p), so p̄, ∇̄ and the pushed state are the same from p and p·g:
runs from two representatives coincide after the first step, up to the orthogonal
stabiliser of the balanced section (steps 2–4 commute with B̄ ↦ B̄K, Ā ↦ KᵀĀ for orthogonal
K). At B = 0 the QR gauge is fixed up to O(r) as well. ``dress=False`` skips step 1 (the
control: then it depends on the representative).

How it differs from LoRA-RITE (``quotopt.baselines.lora_rite``), which has the same moments:
RITE preconditions each factor in the orthonormal frame of the *other* factor (ḡ_B = ∇_B R_A⁻¹,
a different gauge per factor, mapped back by R_A⁻ᵀ), so its step on ΔW does not grow with the
factors' size; here both factors are preconditioned at one representative, the balanced one,
where ∇̄_B = G U_A Σ^½ is magnified by Σ^½ and the step on ΔW scales with the factors as
AdamW's does. RITE carries its moments by the projection P = U_newᵀU_old between frames; here
they are pushed forward by the exact change of gauge u. The direction is projected onto the
horizontal space, the decay acts on the invariants, and nothing is clipped or skipped.
"""

from __future__ import annotations

import torch
from torch import nn

import manifolds as M

from .lora_step import LoRAPairOptimizer, bias_corrected_decay, inverse_root

__all__ = ["QuotientMatrixAdam"]


class QuotientMatrixAdam(LoRAPairOptimizer):
    """Adam with r×r second moments in the dressed frame of each LoRA adapter (module
    docstring).

    Args:
        model: a model whose only trainable parameters are LoRA adapter factors.
        lr, betas: learning rate and (β₁, β₂).
        eps: added to the square root of V's eigenvalues.
        weight_decay: decay of the invariants, B A ↦ (1 − lr·wd) B A.
        dress: dress before every step (False: the gauge-dependent control).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        dress: bool = True,
    ):
        if not isinstance(dress, bool):
            raise ValueError(f"QuotientMatrixAdam: dress must be True or False, got {dress!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, dress=dress)
        super().__init__(model, defaults)

    def _init_state(self, b: torch.Tensor, a: torch.Tensor) -> dict:
        n, _, r = b.shape
        zeros = torch.zeros(n, r, r, dtype=b.dtype, device=b.device)
        return {"step": self._zero_step(b), "exp_avg_b": torch.zeros_like(b),
                "exp_avg_a": torch.zeros_like(a), "precond_b": zeros,
                "precond_a": zeros.clone()}  # fmt: skip

    @staticmethod
    def _gauge(bundle: M.HeadOV, b: torch.Tensor, a: torch.Tensor, first: bool) -> torch.Tensor:
        """u per adapter: the dressing, or at B = 0 the transposed R of Aᵀ = Q R (looked for
        at the ``first`` step only: B leaves 0 at the first step)."""
        u, _ = bundle.dressing_or_identity((b, a))
        if not first:
            return u
        _, r_factor = torch.linalg.qr(a.mT)
        zero_b = (b.abs().amax((-2, -1)) == 0).view(-1, 1, 1)
        return torch.where(zero_b, r_factor.mT, u)

    def _updates(self, work: list) -> list:
        results = []
        for group, b, a, gb, ga, state, fresh in work:
            n, d_out, r = b.shape
            bundle = M.HeadOV(n, d_out, r, factor_rows=(d_out, a.shape[-1]))
            mb, ma = state["exp_avg_b"], state["exp_avg_a"]
            vb, va = state["precond_b"], state["precond_a"]
            with M.unchecked():
                if group["dress"]:
                    u = self._gauge(bundle, b, a, fresh)
                    ui = bundle.inverse(u)
                    b, a, mb, ma = b @ u, ui @ a, mb @ u, ui @ ma
                    gb, ga = gb @ ui.mT, u.mT @ ga
                    vb, va = ui @ vb @ ui.mT, u.mT @ va @ u
                beta1, beta2 = group["betas"]
                decay1 = bias_corrected_decay(state["step"], beta1, b.dtype)
                decay2 = bias_corrected_decay(state["step"], beta2, b.dtype)
                vb = decay2 * vb + (1 - decay2) * (gb.mT @ gb) / d_out
                va = decay2 * va + (1 - decay2) * (ga @ ga.mT) / a.shape[-1]
                vb, va = (vb + vb.mT) / 2, (va + va.mT) / 2
                eps = group["eps"]
                mb = decay1 * mb + (1 - decay1) * (gb @ inverse_root(vb, eps))
                ma = decay1 * ma + (1 - decay1) * (inverse_root(va, eps) @ ga)
                frame = bundle.at((b, a))
                new_b, new_a = frame.descend((mb, ma), group["lr"], group["weight_decay"])
            new_state = {"step": state["step"] + 1, "exp_avg_b": mb, "exp_avg_a": ma,
                         "precond_b": vb, "precond_a": va}  # fmt: skip
            results.append((new_b, new_a, new_state))
        return results
