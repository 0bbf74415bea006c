r"""QuotientMatrixAdam: Adam on LoRA's quotient with an r×r second moment per factor, in the
dressed (balanced) frame of each adapter.

The class and its state (``MatrixAdamState``); adapters of one shape are stacked by the shell
(``quotopt.optim.lora_shell``). Theory, the equivariance argument and how it differs from
LoRA-RITE: docs/theory/optimisers.md#quotientmatrixadam.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import nn

import manifolds as M

from .lora_shell import LoRAPairOptimizer, bias_corrected_decay, inverse_root

__all__ = ["MatrixAdamState", "QuotientMatrixAdam"]


class MatrixAdamState(TypedDict):
    """QuotientMatrixAdam's state of n stacked adapters B (n, d_out, r), A (n, r, d_in), kept
    under the group's first parameter, in the gauge of the current parameters."""

    step: torch.Tensor  # () float64: steps taken
    exp_avg_b: torch.Tensor  # (n, d_out, r): momentum of B, a tangent vector
    exp_avg_a: torch.Tensor  # (n, r, d_in): momentum of A
    precond_b: torch.Tensor  # (n, r, r): Gram of B's gradients, V_B
    precond_a: torch.Tensor  # (n, r, r): Gram of A's gradients, V_A


class QuotientMatrixAdam(LoRAPairOptimizer):
    r"""Adam with r×r second moments in the dressed frame of each LoRA adapter.

    Each adapter ΔW = B A is a point of ``manifolds.HeadOV`` with one head (action
    (B g, g⁻¹A)). With moments (M_B, M_A), Grams (V_B, V_A) and Adafactor's bias-corrected
    decays β̃ (``lora_shell.bias_corrected_decay``), one step is::

        u = dressing(B, A)  (at B = 0 on the first step: Rᵀ from Aᵀ = Q R)
        (B, A) ← (B u, u⁻¹A);  ∇ ← (∇_B u⁻ᵀ, uᵀ∇_A);  M ← (M_B u, u⁻¹M_A)
        V_B ← u⁻¹V_B u⁻ᵀ;  V_A ← uᵀV_A u                      # carried by the same u
        V_B ← β̃₂V_B + (1 − β̃₂) ∇_Bᵀ∇_B / d_out;  V_A ← β̃₂V_A + (1 − β̃₂) ∇_A∇_Aᵀ / d_in
        M ← β̃₁M + (1 − β̃₁)(∇_B V_B^{-1/2}, V_A^{-1/2} ∇_A)     # ε outside the root
        (B, A) ← retract(scale_invariants((B, A), 1 − lr·wd), −lr·P_H M)

    Runs from (B, A) and (B S, S⁻¹A) coincide after the first step (up to the orthogonal
    stabiliser of the balanced section); ``dress=False`` is the gauge-dependent control.

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

    def _init_state(self, b: torch.Tensor, a: torch.Tensor) -> MatrixAdamState:
        n, _, r = b.shape
        zeros = torch.zeros(n, r, r, dtype=b.dtype, device=b.device)
        return MatrixAdamState(
            step=self._zero_step(b),
            exp_avg_b=torch.zeros_like(b),
            exp_avg_a=torch.zeros_like(a),
            precond_b=zeros,
            precond_a=zeros.clone(),
        )

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
            step = state["step"] + 1
            new_state = MatrixAdamState(
                step=step, exp_avg_b=mb, exp_avg_a=ma, precond_b=vb, precond_a=va
            )
            results.append((new_b, new_a, new_state))
        return results
