"""Batched linear algebra for the bundles: symmetric parts, Sylvester/Lyapunov solves, frames.

Every function acts on the last two axes and broadcasts over any leading (head, layer) axes.
Small r x r work is done in at least float32 (bf16 eigen-solvers are not available and would be
too coarse); results are cast back to the input dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "work_dtype",
    "positive_int",
    "pinv_spectrum",
    "divide_spectral",
    "sym",
    "skew",
    "gram",
    "times",
    "cross",
    "congruence",
    "row_mean_square",
    "solve_in_eigenbases",
    "solve_sylvester_spd",
    "solve_lyapunov_spd",
    "solve_left",
    "inverse",
    "orthonormal_columns_sign_fixed",
    "sign_fix_columns",
    "relative_gaps",
    "numerical_rank",
]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype used for small dense factorisations: float32 at least (the one working-precision
    rule of the package; bf16/fp16 factorisations are not available and would be too coarse)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def positive_int(name: str, value) -> int:
    """``value`` if it is a positive int, else a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def sym(x: torch.Tensor) -> torch.Tensor:
    """Symmetric part (x + xᵀ)/2 of the last two axes."""
    return 0.5 * (x + x.mT)


def skew(x: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric part (x - xᵀ)/2 of the last two axes."""
    return 0.5 * (x - x.mT)


def gram(a: torch.Tensor) -> torch.Tensor:
    """aᵀa over the last two axes, symmetrised against round-off (one column: its squared
    norm, a reduction rather than a batch of 1×1 products, and no temporary the size of a)."""
    if a.shape[-1] == 1:
        return torch.linalg.vector_norm(a, dim=-2, keepdim=True).square()
    return sym(a.mT @ a)


def times(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ m for a batch of r×r matrices m; for r = 1 — one per unit of a ``PositiveRescaling``
    — a broadcast product (a batch of 1×1 matrix products is about thirty times slower)."""
    if m.shape[-2:] == (1, 1):
        return x * m
    return x @ m


def congruence(statistic: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """cᵀ S c (batched): how an r×r statistic S of a factor moves when the factor is
    multiplied by c on the right."""
    return c.mT @ statistic.to(c.dtype) @ c


def row_mean_square(u: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of u the mean of u ∘ u over the last axis, (…, rows, 1); with ``g`` the mean of
    u ∘ g, clamped at 0 (a quadratic form u M uᵀ written as rowsum(u ∘ g) for g = u M, which
    round-off may push below 0). One column (the units of a ``PositiveRescaling``): the
    products themselves. Without ``g`` through the row norms: one pass, no temporary the size
    of u (page faults on CPUs)."""
    if g is not None:
        product = u * g
        if u.shape[-1] != 1:
            product = product.sum(-1, keepdim=True).div_(u.shape[-1])
        return product.clamp_min_(0)
    if u.shape[-1] == 1:
        return u.square()
    return torch.linalg.vector_norm(u, dim=-1, keepdim=True).square_().div_(u.shape[-1])


def cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀy over the last two axes; for single columns their inner product, a reduction."""
    if x.shape[-1] == 1 and y.shape[-1] == 1:
        return (x * y).sum(-2, keepdim=True)
    return x.mT @ y


def symmetric_eigh(spd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (ascending), with 1×1 matrices — one per unit of a
    ``PositiveRescaling`` — written down (value, 1) instead of a batch of LAPACK calls."""
    if spd.shape[-1] == 1:
        return spd[..., 0], torch.ones_like(spd)
    return torch.linalg.eigh(spd)


def _eigh(spd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    work = work_dtype(spd.dtype)
    evals, evecs = torch.linalg.eigh(spd.to(work))
    return evals, evecs


def divide_spectral(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator ⊘ denominator, zero where the denominator vanishes (pseudo-inverse).

    A vanishing λᵢ + μⱼ means the corresponding group direction does not move the point (a
    stabiliser direction); the minimum-norm solution puts nothing there.
    """
    scale = denominator.abs().amax(dim=(-2, -1), keepdim=True)
    tiny = scale * (torch.finfo(denominator.dtype).eps * max(denominator.shape[-2:]) * 8)
    safe = torch.where(denominator > tiny, denominator, torch.ones_like(denominator))
    return torch.where(denominator > tiny, numerator / safe, torch.zeros_like(numerator))


def pinv_spectrum(evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor:
    """U diag(1/λ)⁺ Uᵀ from an eigendecomposition: the pseudo-inverse of a symmetric positive
    semi-definite matrix, zero on eigenvalues at round-off level (as ``divide_spectral``)."""
    column = evals.unsqueeze(-1)  # (…, n, 1): the threshold is relative to the largest
    inverse = divide_spectral(torch.ones_like(column), column).squeeze(-1)
    return (evecs * inverse.unsqueeze(-2)) @ evecs.mT


def solve_in_eigenbases(u, v, c, denominator) -> torch.Tensor:
    """U [(Uᵀ c V) ⊘ D] Vᵀ: the solution of an equation that is diagonal in the eigenbases U, V
    of two symmetric matrices, with D its (…, r, r) diagonal (zero entries: minimum norm). With
    p = UΛUᵀ, q = VMVᵀ and Dᵢⱼ = λᵢ + μⱼ it solves the Sylvester equation pξ + ξq = c; the
    bundles pass the factorisations of their frames and their metrics' own D."""
    rotated = u.mT @ c.to(u.dtype) @ v
    return u @ divide_spectral(rotated, denominator) @ v.mT


def solve_sylvester_spd(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Solve p ξ + ξ q = c for symmetric positive (semi-)definite p and q.

    With p = U Λ Uᵀ and q = V M Vᵀ: ξ = U [(Uᵀ c V) ⊘ (λᵢ + μⱼ)] Vᵀ. Two batched ``eigh``,
    O(r³) per matrix. Pairs with λᵢ + μⱼ = 0 get the minimum-norm (zero) component.
    """
    lam, u = _eigh(p)
    mu, v = _eigh(q)
    return solve_in_eigenbases(u, v, c, lam.unsqueeze(-1) + mu.unsqueeze(-2)).to(c.dtype)


def solve_lyapunov_spd(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Solve p ω + ω p = c for symmetric positive semi-definite p (one ``eigh``).

    For skew c the solution is skew. Minimum-norm where p is singular.
    """
    lam, u = _eigh(p)
    return solve_in_eigenbases(u, u, c, lam.unsqueeze(-1) + lam.unsqueeze(-2)).to(c.dtype)


def solve_left(g: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """g⁻¹·rhs for square invertible g (batched), by Householder QR and a triangular solve, in
    the working precision. Not by LU: torch's batched CPU LU (oneMKL ``getrf`` run on several
    matrices at once) returns wrong pivots with more than one thread for matrices larger than
    about 150, and ``torch.linalg.solve`` and ``inv`` then fail or return wrong values
    (pytorch issue 142815); QR is backward stable too and costs about twice as much."""
    work = work_dtype(g.dtype)
    q, r = torch.linalg.qr(g.to(work))
    return torch.linalg.solve_triangular(r, q.mT @ rhs.to(work), upper=True).to(rhs.dtype)


def inverse(g: torch.Tensor) -> torch.Tensor:
    """g⁻¹ (batched), by ``solve_left``."""
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device).expand_as(g)
    return solve_left(g, eye)


def sign_fix_columns(coords: torch.Tensor) -> torch.Tensor:
    """The signs (…, 1, n) that make the entry of largest magnitude of every column of
    ``coords`` positive (+1 for a zero column): the package's one sign convention."""
    index = coords.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(coords, -2, index))
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def orthonormal_columns_sign_fixed(basis: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Flip columns of ``basis`` so that in ``coords`` (= data expressed in the basis) the entry
    of largest magnitude of every column is positive. Returns the fixed basis.

    This is the deterministic convention that removes the sign ambiguity of eigen- and singular
    vectors; it is invariant because ``coords`` are (up to these signs) gauge-invariant.
    """
    return basis * sign_fix_columns(coords)


def relative_gaps(values: torch.Tensor) -> torch.Tensor:
    """Smallest relative gap of a descending spectrum, min_i (s_i - s_{i+1}) / s_1.

    The canonical frames built from that spectrum are unique exactly when the gap is positive;
    a spectrum of one value has no gap to resolve and reports 1.
    """
    if values.shape[-1] < 2:
        return torch.ones(values.shape[:-1], dtype=values.dtype, device=values.device)
    top = values[..., :1].abs().clamp_min(torch.finfo(values.dtype).tiny)
    return ((values[..., :-1] - values[..., 1:]) / top).amin(dim=-1)


def numerical_rank(a: torch.Tensor, rel_tol: float | None = None) -> torch.Tensor:
    """Numerical rank of each matrix: singular values above rel_tol·s_max, by default
    max(m, n)·eps of the working precision; an explicit ``rel_tol`` is applied in float64."""
    work = work_dtype(a.dtype) if rel_tol is None else torch.float64
    s = torch.linalg.svdvals(a.to(work))
    rel = max(a.shape[-2:]) * torch.finfo(work).eps if rel_tol is None else rel_tol
    return (s > s[..., :1] * rel).sum(dim=-1)
