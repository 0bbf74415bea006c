r"""LoRA-RITE: a transformation-invariant Adam for LoRA adapters.

Yen, Si, Hsieh, Kumar, Dhillon, Kale, "LoRA Done RITE: Robust Invariant Transformation
Equilibration for LoRA Optimization" (ICLR 2025, arXiv:2410.20625); the defaults are those of
the authors' PyTorch reimplementation (``gkevinyen5418/LoRA-RITE``, ``lora_rite.py``). Per
adapter ΔW = B A (B (d_out, r), A (r, d_in)), pairs found per adapter module and stacked by
shape (``quotopt.optim.lora_shell``). One step, per adapter and per factor (shown for B; A is the
same with the roles swapped, on Aᵀ (d_in, r)):

* frames: B = U_B R_B and Aᵀ = U_A R_A (reduced QR); R⁺ the pseudo-inverse (R = 0 at B = 0);
* the unmagnified gradient ḡ_B = ∇_B R_A⁺ (= G U_A for ∇_B = G Aᵀ): zeroed when its RMS
  exceeds ``skip`` (per factor and adapter); then all ḡ of all adapters are scaled jointly to
  global norm at most ``clip``;
* transport into this step's frame: P_B = U_A,newᵀ U_A,old; V_B ← P_B V_B P_Bᵀ, M_B ← M_B P_Bᵀ;
* V_B ← β̃₂ V_B + (1 − β̃₂) ḡ_Bᵀ ḡ_B / d_out (an r×r matrix, Adafactor's bias-corrected decay
  β̃ = β(1 − β^{t−1})/(1 − β^t), so no other bias correction);
* M_B ← β̃₁ M_B + (1 − β̃₁) ḡ_B (V_B + ρ_B I)^{-1/2}, ε outside the root (``inverse_root``);
* B ← B − lr (M_B R_A⁺ᵀ + wd·B) (the decay added to the step, scaled by lr).

The escaped mass ρ (``escaped_mass=True``, off by default as in the reference): the second
moment lost by the transport, e = min(max(λ(V_old) − λ(PV_oldPᵀ)), tr V_old − tr PV_oldPᵀ)⁺
(eigenvalues in ascending order), accumulated as ρ ← β̃₂(ρ + e), added to V's eigenvalues
inside the root. The reference's update capping and norm balancing (both off by default) are
not ported.

Invariance: for S ∈ GL(r), (B S, S⁻¹A) has frames U_B Q, U_A Q' (Q, Q' orthogonal) and the
same ḡ up to those rotations, so every quantity above is carried along and ΔW = B A is the
same from either representative (``tests/lab/baselines/test_lora_rite.py`` checks it, and that
AdamW's is
not). Where the reference hides a non-finite value (``nan_to_num``) this port raises
``NonFiniteStepError`` and writes nothing; where the reference's eigenvalue of a semi-definite
V rounds below 0 and turns the whole update into NaN (then 0), this port takes it as 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ...optim.lora_shell import LoRAPairOptimizer, bias_corrected_decay, inverse_root
from ...optim.lora_shell import check_number as _check

__all__ = ["LoRARITE", "lora_rite"]


def _frame(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, R⁺) of x = U R (reduced QR), per matrix of the batch."""
    u, r = torch.linalg.qr(x)
    return u, torch.linalg.pinv(r)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return (x + x.mT) / 2


def _escaped(old: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """min(max(λ(old) − λ(moved)), tr old − tr moved), floored at 0, per matrix."""
    gap = (torch.linalg.eigvalsh(old) - torch.linalg.eigvalsh(moved)).amax(-1).clamp(min=0)
    trace = (
        old.diagonal(dim1=-2, dim2=-1).sum(-1) - moved.diagonal(dim1=-2, dim2=-1).sum(-1)
    ).clamp(min=0)
    return torch.minimum(gap, trace)


class LoRARITE(LoRAPairOptimizer):
    """LoRA-RITE over the trainable adapters of ``model`` (module docstring).

    Args:
        model: a model whose only trainable parameters are LoRA adapter factors.
        lr: learning rate.
        betas: (β₁, β₂) of the first moment and the r×r second moment.
        eps: added to the square root of V's eigenvalues (outside the root).
        weight_decay: ``wd``: −lr·wd·X added to each factor's step.
        clip: the largest global norm of the unmagnified gradients (0: no clipping).
        skip: a factor's unmagnified gradient with RMS above it is zeroed (0: never).
        escaped_mass: add the escaped mass of the second moment inside the root.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        clip: float = 1.0,
        skip: float = 1.0,
        escaped_mass: bool = False,
    ):
        _check("LoRARITE", "clip", clip)
        _check("LoRARITE", "skip", skip)
        if not isinstance(escaped_mass, bool):
            raise ValueError(f"LoRARITE: escaped_mass must be True or False, got {escaped_mass!r}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            clip=clip,
            skip=skip,
            escaped_mass=escaped_mass,
        )
        super().__init__(model, defaults)

    def _init_state(self, b: torch.Tensor, a: torch.Tensor) -> dict:
        n, d_out, r = b.shape
        d_in = a.shape[-1]
        like = dict(dtype=b.dtype, device=b.device)
        state = {"step": self._zero_step(b)}
        for side, rows in (("b", d_out), ("a", d_in)):
            state[f"exp_avg_{side}"] = torch.zeros(n, rows, r, **like)
            state[f"basis_{side}"] = torch.zeros(n, rows, r, **like)
            state[f"precond_{side}"] = torch.zeros(n, r, r, **like)
            state[f"escaped_{side}"] = torch.zeros(n, **like)
        return state

    def _updates(self, work: list) -> list:
        prepared, total = [], 0
        for group, b, a, gb, ga, _, _ in work:
            u_b, rb_pinv = _frame(b)  # B = U_B R_B
            u_a, ra_pinv = _frame(a.mT)  # Aᵀ = U_A R_A
            # unmagnified: ḡ_B = ∇_B R_A⁺ (in A's frame), ḡ_A = ∇_Aᵀ R_B⁺ (in B's frame)
            bar = {"b": gb @ ra_pinv, "a": ga.mT @ rb_pinv}
            if group["skip"] > 0:
                for side, g in bar.items():
                    rms = g.square().mean((-2, -1), keepdim=True).sqrt()
                    bar[side] = torch.where(rms > group["skip"], torch.zeros_like(g), g)
            total = total + sum(g.square().sum() for g in bar.values())
            prepared.append((bar, u_b, u_a, rb_pinv, ra_pinv))
        norm = total.sqrt()
        results = []
        for (group, b, a, _, _, state, _), (bar, u_b, u_a, rb_pinv, ra_pinv) in zip(work, prepared):
            clip = group["clip"]
            scale = clip / norm.clamp(min=clip) if clip > 0 else None
            step = state["step"]
            beta1, beta2 = group["betas"]
            decay1 = bias_corrected_decay(step, beta1, b.dtype)
            decay2 = bias_corrected_decay(step, beta2, b.dtype)
            # B's moments live in A's frame and the other way round
            transport = {"b": u_a.mT @ state["basis_a"], "a": u_b.mT @ state["basis_b"]}
            new_state = {"step": step + 1, "basis_b": u_b, "basis_a": u_a}
            moved = {}
            for side in ("b", "a"):
                g = bar[side] if scale is None else bar[side] * scale
                p, old = transport[side], state[f"precond_{side}"]
                carried = _sym(p @ old @ p.mT)
                v = _sym(decay2 * carried + (1 - decay2) * _sym(g.mT @ g / g.shape[-2]))
                ridge = 0.0
                if group["escaped_mass"]:
                    escaped = decay2 * (_escaped(old, carried) + state[f"escaped_{side}"])
                    ridge = escaped
                else:
                    escaped = state[f"escaped_{side}"]
                direction = g @ inverse_root(v, group["eps"], ridge)
                m = decay1 * (state[f"exp_avg_{side}"] @ p.mT) + (1 - decay1) * direction
                new_state[f"precond_{side}"] = v
                new_state[f"escaped_{side}"] = escaped
                new_state[f"exp_avg_{side}"] = m
                moved[side] = m
            lr, wd = group["lr"], group["weight_decay"]
            new_b = b - lr * (moved["b"] @ ra_pinv.mT + wd * b)
            new_a = a - lr * (moved["a"] @ rb_pinv.mT + wd * a.mT).mT
            results.append((new_b, new_a, new_state))
        return results


def lora_rite(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    **options,
) -> LoRARITE:
    """``LoRARITE`` with the baselines' factory signature (``quotopt.lab.baselines``)."""
    return LoRARITE(model, lr, betas, weight_decay=weight_decay, **options)
