r"""The 2 × 2 plane blocks of the RoPE commutant (``manifolds.rotary``): each plane's group
element is a complex scalar re + i·im, written as the block [[re, im], [−im, re]] (basis
E₀ = I, E₁ = K), and the invariant metric's normal equations in those blocks
(``_plane_system``; derivation in ``docs/theory/projections.md#rotary-heads``)."""

from __future__ import annotations

import torch

__all__ = ["complex_part", "complex_blocks"]

# Basis of the Lie algebra C ⊂ gl(2) of one plane: E₀ = I (scaling), E₁ = K (rotation).
_K = ((0.0, 1.0), (-1.0, 0.0))


def _basis(like: torch.Tensor) -> torch.Tensor:
    """(2, 2, 2): E₀ = I, E₁ = K, in ``like``'s dtype and device."""
    return torch.tensor(((1.0, 0.0), (0.0, 1.0)) + _K, dtype=like.dtype, device=like.device).view(
        2, 2, 2
    )


#: the invariant metric's plane system (``_plane_system``): for (s, t) = (0, 0), (0, 1), (1, 0),
#: (1, 1) — E₀ = I, E₁ = ``_K`` — the block entries k = 2c + e of Qᵀ that meet P's entry
#: k = 2a + b in tr(E_s P_ij E_t Q_ji), and their signs
_SYSTEM_ENTRIES = ((0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0))
_SYSTEM_SIGNS = ((1, 1, 1, 1), (1, -1, 1, -1), (1, 1, -1, -1), (1, -1, -1, 1))


def _plane_system(p: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """2 tr(E_s P_ij E_t Q_ji) for E₀ = I, E₁ = K, as (H, m, 2, m, 2) indexed (i, s, j, t):
    the invariant metric's normal equations of the RoPE commutant, from the 2 × 2 block
    entries of P (``p``: (H, 4, m, m), entry 2a + b of block (i, j)) and of Qᵀ (``qt``, the
    same layout). Each trace is Σ_ab P_ij[a, b]·±Q_ji[e, c] with (c, e) a signed permutation
    of (a, b) (``_SYSTEM_ENTRIES``): products of m × m slabs, summed over the four entries
    (a contraction of the blocks as 2 × 2 matrices is ten times slower)."""
    h, m = p.shape[0], p.shape[-1]
    index = torch.tensor(_SYSTEM_ENTRIES, device=p.device).view(-1)
    signs = torch.tensor(_SYSTEM_SIGNS, dtype=p.dtype, device=p.device).view(1, 4, 4, 1, 1)
    partners = qt.index_select(1, index).view(h, 4, 4, m, m)  # (H, st, k, m, m)
    system = (partners * signs * p.unsqueeze(1)).sum(2)  # (H, st, i, j)
    return 2 * system.view(h, 2, 2, m, m).permute(0, 3, 1, 4, 2)


def complex_part(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(re, im) of c(g) for 2×2 blocks g (…, 2, 2) written [[re, im], [-im, re]]."""
    re = 0.5 * (g[..., 0, 0] + g[..., 1, 1])
    im = 0.5 * (g[..., 0, 1] - g[..., 1, 0])
    return re, im


def complex_blocks(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """The 2×2 blocks [[re, im], [-im, re]]: multiplication by re + i·im on row vectors."""
    return torch.stack((torch.stack((re, im), -1), torch.stack((-im, re), -1)), -2)
