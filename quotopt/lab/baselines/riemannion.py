r"""Riemannion: Muon on the manifold of rank-r matrices, for LoRA adapters.

Bogachev, Aletov, Molozhavenko, Bobkov, Soboleva, Alanov, Rakhuba, "LoRA meets Riemannion: Muon
Optimizer for Parametrization-independent Low-Rank Adapters" (ICLR 2026, arXiv:2507.12142),
its Algorithm 4 with the sub-procedures OrthoLR (polar factor of a factored matrix: two thin
QRs and the SVD of a small core) and ProjectLR (tangent projection of a factored matrix). Per
adapter the point is X = B A (B (d_out, r), A (r, d_in); the LoRA scaling α/r sits in the
gradient G = ∂L/∂X), pairs found per adapter module and stacked by shape
(``quotopt.optim.lora_shell``). One step, per adapter:

.. code-block:: text

    B = U_L R_L, Aᵀ = U_R R_R (thin QR);  G U_R = ∇_B R_R⁻¹,  Gᵀ U_L = ∇_Aᵀ R_L⁻¹
    grad   = (Ȧ, Ḃ) = ((I − U_L U_Lᵀ) G U_R, Gᵀ U_L)        (ξ = Ȧ U_Rᵀ + U_L Ḃᵀ)
    m      = β · P_X(stored) + grad                            (transport = tangent projection)
    D      = P_X(polar(m))                                     (OrthoLR, then ProjectLR)
    stored ← D  (or m with ``store="momentum"``)
    X_new  = truncSVD_r((1 − ηγ) X − η D);   B ← U,  A ← Σ Vᵀ

η is ``lr`` (times 0.2·√max(d_out, d_in) with ``adjust_lr_fn="match_rms_adamw"``, Muon's
convention), γ the weight decay. Singular values of m below ``eps``·σ_max are dropped from
the polar factor. The derivation, the choices this port made (the stored vector, the rate
scaling, the B = 0 start) and on what reading of the paper it rests (its text could not be
read here; public ports that follow its Algorithm 4 agree on the steps above) are in
``docs/theory/lora.md``.

Invariance: every quantity above depends on (B, A) only through X = B A, the column space of
B and the row space of A, so (B S, S⁻¹A) for S ∈ GL(r) gives the same steps
(``tests/lab/baselines/test_riemannion.py``, with AdamW as the control that fails).

The B = 0 start (X = 0, off the manifold): the factor gradients give only G U_R (∇_A = Bᵀ G
= 0), so the point is taken with an empty left frame (U_L = 0) and the right frame of A: the
first step is the polar factor of G U_R U_Rᵀ, the projection of G onto the matrices with A's
row space, retracted to rank r. A factor is zero when its QR's diagonal is, to ``r``·machine
precision of its largest entry (exactly for B = 0).

Half-precision factors (float16, bfloat16) step in float32 and are written back in their own
dtype, as is the state (QR and SVD have no half-precision kernels).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...optim.lora_shell import LoRAPairOptimizer
from ...optim.lora_shell import check_number as _check

__all__ = ["Riemannion", "riemannion"]

_ADJUST = (None, "match_rms_adamw")
_STORE = ("direction", "momentum")


def _frame(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, R, R⁻¹) of x = U R (thin QR). A pivot of R that vanishes (to r·machine precision of
    the largest; all of them exactly when x = 0) sets its column of U to 0, so that U Uᵀ
    projects onto x's range, and is replaced by 1 in the inverse (which then multiplies a zero
    gradient: ∇_A = Bᵀ G = 0 at B = 0)."""
    u, r = torch.linalg.qr(x)
    diag = r.diagonal(dim1=-2, dim2=-1).abs()
    tol = diag.shape[-1] * torch.finfo(x.dtype).eps * diag.amax(-1, keepdim=True)
    keep = (diag > tol).to(x.dtype)
    eye = torch.eye(r.shape[-1], dtype=x.dtype, device=x.device)
    inverse = torch.linalg.solve_triangular(r + torch.diag_embed(1 - keep), eye, upper=True)
    return u * keep.unsqueeze(-2), r, inverse


def project(
    left: torch.Tensor, right: torch.Tensor, u_l: torch.Tensor, u_r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProjectLR: the tangent coordinates (Ȧ, Ḃ) of P_X(Z) for Z = left rightᵀ, i.e.
    P_X(Z) = Ȧ U_Rᵀ + U_L Ḃᵀ with Ȧ = (I − U_L U_Lᵀ) Z U_R, Ḃ = Zᵀ U_L (Z never formed)."""
    bdot = right @ (left.mT @ u_l)
    adot = (left - u_l @ (u_l.mT @ left)) @ (right.mT @ u_r)
    return adot, bdot


def _svd_factored(u_l, u_r, t_a, t_b):
    """The SVD of Z = t_a U_Rᵀ + U_L t_bᵀ (t_a ⟂ U_L, rank ≤ 2r) through one 2r × 2r core:
    t_a = Q_a R_a, (I − U_R U_Rᵀ) t_b = Q_b R_b, K = U_Rᵀ t_b give
    Z = [Q_a, U_L] [[R_a, 0], [Kᵀ, R_bᵀ]] [U_R, Q_b]ᵀ with orthonormal outer factors.
    Returns (left, singular values, right): Z = left diag(s) rightᵀ."""
    q_a, r_a = torch.linalg.qr(t_a)
    k = u_r.mT @ t_b
    q_b, r_b = torch.linalg.qr(t_b - u_r @ k)
    top = torch.cat([r_a, torch.zeros_like(r_a)], -1)
    core = torch.cat([top, torch.cat([k.mT, r_b.mT], -1)], -2)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return torch.cat([q_a, u_l], -1) @ u, s, torch.cat([u_r, q_b], -1) @ vh.mT


def polar(u_l, u_r, t_a, t_b, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OrthoLR: factors (P, Q) of the polar factor P Qᵀ of Z = t_a U_Rᵀ + U_L t_bᵀ, singular
    values below ``eps``·σ_max dropped."""
    left, s, right = _svd_factored(u_l, u_r, t_a, t_b)
    keep = (s > eps * s[..., :1]).to(s.dtype)
    return left * keep.unsqueeze(-2), right


class Riemannion(LoRAPairOptimizer):
    """Riemannion over the trainable adapters of ``model`` (module docstring).

    Args:
        model: a model whose only trainable parameters are LoRA adapter factors.
        lr: learning rate η (a step on X = B A; see ``adjust_lr_fn``).
        momentum: the heavy-ball coefficient β, in [0, 1).
        weight_decay: γ: the retraction starts from (1 − ηγ) X.
        eps: singular values of the momentum below ``eps``·σ_max are left out of its polar
            factor.
        adjust_lr_fn: ``None`` (η = lr, as in the paper) or ``"match_rms_adamw"`` (η = 0.2 ·
            √max(d_out, d_in) · lr, ``torch.optim.Muon``'s scaling, so AdamW's rates carry over).
        store: what is transported to the next step: ``"direction"`` (the projected polar
            factor, the paper's Algorithm 4 as read here) or ``"momentum"`` (the accumulated
            tangent momentum before orthogonalisation, Muon's convention).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        store: str = "direction",
    ):
        _check("Riemannion", "momentum", momentum, below_one=True)
        if not (isinstance(eps, float) and 0 < eps < 1):
            raise ValueError(f"Riemannion: eps must be a float in (0, 1), got {eps!r}")
        if adjust_lr_fn not in _ADJUST:
            choices = f"one of {_ADJUST}"
            raise ValueError(f"Riemannion: adjust_lr_fn must be {choices}, got {adjust_lr_fn!r}")
        if store not in _STORE:
            raise ValueError(f"Riemannion: store must be one of {_STORE}, got {store!r}")
        rules = dict(adjust_lr_fn=adjust_lr_fn, store=store)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, **rules)
        super().__init__(model, defaults)

    def _init_state(self, b: torch.Tensor, a: torch.Tensor) -> dict:
        n, d_out, r = b.shape
        like = dict(dtype=b.dtype, device=b.device)
        return {
            "step": self._zero_step(b),
            "stored_left": torch.zeros(n, d_out, 2 * r, **like),  # Z = left rightᵀ
            "stored_right": torch.zeros(n, a.shape[-1], 2 * r, **like),
        }

    def _updates(self, work: list) -> list:
        results = []
        for group, b, a, gb, ga, state, _ in work:
            # QR and SVD take float32 or float64: half-precision factors step in float32
            low = b.dtype in (torch.float16, torch.bfloat16)
            wide = (lambda t: t.float()) if low else (lambda t: t)
            moved = {k: v if k == "step" else wide(v) for k, v in state.items()}
            new_b, new_a, new_state = self._update(group, *map(wide, (b, a, gb, ga)), moved)
            back = {k: v if k == "step" else v.to(b.dtype) for k, v in new_state.items()}
            results.append((new_b.to(b.dtype), new_a.to(b.dtype), back))
        return results

    @staticmethod
    def _update(group, b, a, gb, ga, state):
        (_, d_out, r), d_in = b.shape, a.shape[-1]
        u_l, r_l, rl_inv = _frame(b)  # B = U_L R_L
        u_r, r_r, rr_inv = _frame(a.mT)  # Aᵀ = U_R R_R
        g_ur = gb @ rr_inv  # G U_R
        grad_a = g_ur - u_l @ (u_l.mT @ g_ur)  # (I − U_L U_Lᵀ) G U_R
        grad_b = ga.mT @ rl_inv  # Gᵀ U_L
        beta = group["momentum"]
        moved_a, moved_b = project(state["stored_left"], state["stored_right"], u_l, u_r)
        m_a, m_b = beta * moved_a + grad_a, beta * moved_b + grad_b
        p, q = polar(u_l, u_r, m_a, m_b, group["eps"])
        d_a, d_b = project(p, q, u_l, u_r)
        kept_a, kept_b = (d_a, d_b) if group["store"] == "direction" else (m_a, m_b)
        eta = group["lr"]
        if group["adjust_lr_fn"] == "match_rms_adamw":
            eta = eta * 0.2 * math.sqrt(max(d_out, d_in))
        shrink = 1 - eta * group["weight_decay"]
        core = r_l @ r_r.mT  # X = U_L core U_Rᵀ
        # (1 − ηγ) X − η (D_A U_Rᵀ + U_L D_Bᵀ) = (−η D_A) U_Rᵀ + U_L ((1 − ηγ) U_R coreᵀ − η D_B)ᵀ
        u, s, v = _svd_factored(u_l, u_r, -eta * d_a, shrink * (u_r @ core.mT) - eta * d_b)
        u, s, v = u[..., :r], s[..., :r], v[..., :r]
        new_state = {
            "step": state["step"] + 1,
            "stored_left": torch.cat([kept_a, u_l], -1),
            "stored_right": torch.cat([u_r, kept_b], -1),
        }
        return u, s.unsqueeze(-1) * v.mT, new_state


def riemannion(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    **options,
) -> Riemannion:
    """``Riemannion`` with the baselines' factory signature (``quotopt.lab.baselines``); the
    momentum is ``betas[0]``."""
    return Riemannion(model, lr, betas[0], weight_decay, **options)
