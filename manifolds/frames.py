r"""The frame of a factored point: the factorisation that every operation there reuses.

``FactorFrame`` holds, per head, the float64 Grams P = AᵀA, Q = BᵀB and one factorisation of
each (``frame_from_grams``): eigendecompositions for the Euclidean and the damped invariant
metrics, Cholesky factors for the undamped invariant one. A *balanced* point (AᵀA = BᵀB =
diag S, the dressed section of the head bundles) has its frame in closed form
(``balanced_frame``); ``merge_frames`` picks per head between two frames. ``iterative_frame``
builds the same frame by matmul-only iterations (``manifolds.iterative``), flagging the heads
they cannot handle; ``with_fallback`` puts the exact frame in for those.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .iterative import EigenbasisSylvester, SylvesterSolver, roots, supported_condition
from .linalg import pinv_spectrum, sym, symmetric_eigh

__all__ = [
    "FactorFrame",
    "frame_from_grams",
    "grams_frame",
    "balanced_frame",
    "merge_frames",
    "iterative_frame",
    "with_fallback",
    "warm_frame",
    "step_scale",
]


class FactorFrame(NamedTuple):
    """The factorisation of a factored point that every operation at that point reuses.

    ``p``, ``q``: the Grams AᵀA, BᵀB (H, r, r), float64; ``inv_p``, ``inv_q``: the inverses of
    the metric's Grams (P + δ_P)⁺, (Q + δ_Q)⁺; ``root_p``, ``root_q``: square-root factors
    R Rᵀ = P + δ_P (likewise Q), so that metric norms are sums of squares ‖u R‖² — never
    negative, without the cancellation of u (P + δ) uᵀ in float32. A *spectral* frame also holds the
    eigendecompositions ``lam, u`` and ``mu, v`` (ascending) and the dampings (H, 1) — what the
    Euclidean and the damped metrics' projections need; the undamped invariant metric's closed
    form needs only Cholesky factors (``lam`` … ``v`` are None, ``deficient`` flags heads whose
    Cholesky factorisation failed or whose Gram is singular to working precision).

    An *iterative* frame (``iterative_frame``) holds no eigendecomposition: ``sylvester``
    solves the Euclidean projection's equation, ``inv_*`` and ``root_*`` come from Newton–
    Schulz square roots, and ``fallback`` (H,) flags the heads the iterations could not handle
    (where ``with_fallback`` has put the exact frame in, its eigendecompositions are held too).

    A *warm* frame (``warm_frame``, the Euclidean metric's frame between exact factorisations)
    holds the Grams and ``warm``, a solver in the eigenbases of the last exact frame
    (``manifolds.iterative.EigenbasisSylvester``), and no eigendecomposition of its own.

    ``system``: the Cholesky factor of a projection's normal equations where a bundle solves
    them at every projection (``RotaryQK`` under the invariant metric): factorised with the
    frame, so the two projections at a point (a step's, and the transport to it) share it.
    """

    p: torch.Tensor
    q: torch.Tensor
    inv_p: torch.Tensor | None
    inv_q: torch.Tensor | None
    root_p: torch.Tensor | None
    root_q: torch.Tensor | None
    damp_p: torch.Tensor
    damp_q: torch.Tensor
    deficient: torch.Tensor
    lam: torch.Tensor | None = None
    u: torch.Tensor | None = None
    mu: torch.Tensor | None = None
    v: torch.Tensor | None = None
    sylvester: SylvesterSolver | None = None
    fallback: torch.Tensor | None = None
    warm: EigenbasisSylvester | None = None
    system: torch.Tensor | None = None


def _low(values: torch.Tensor, top: torch.Tensor, r: int) -> torch.Tensor:
    """values ≤ 8·r·eps·top: an eigenvalue (or squared pivot) at round-off level."""
    return values <= 8 * r * torch.finfo(values.dtype).eps * top.abs()


def _cholesky_inverse(gram_: torch.Tensor):
    """((G + δ)⁻¹, L with L Lᵀ = G + δ, δ (H, 1), singular (H,)) by Cholesky, without host
    synchronisation on accelerators (on the CPU, where reading a flag costs nothing, the
    damped factorisation is computed only when some head needs it).

    δ = 0 except on heads whose factorisation fails or whose pivots are at round-off level:
    there the undamped metric is undefined, and the head is given the damping δ = tr(G)/r
    (flagged, so the optimiser reports it). A zero Gram (an all-zero factor, LoRA's B = 0) has
    no scale to damp with: it gets the pseudo-inverse of the zero matrix, inverse and square
    root zero, as the spectral frames do — the other factor's gradient vanishes there, so no
    direction of the metric is lost."""
    chol, info = _cholesky(gram_)
    pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
    r = gram_.shape[-1]
    singular = (info > 0) | _low(pivots.amin(-1), pivots.amax(-1), r)
    singular |= ~pivots.isfinite().all(-1)
    eye = torch.eye(r, dtype=gram_.dtype, device=gram_.device)
    mean = torch.diagonal(gram_, dim1=-2, dim2=-1).sum(-1, keepdim=True) / r
    nonzero = mean > 0  # (H, 1): False on zero Grams
    damp = torch.where(singular.unsqueeze(-1), torch.where(nonzero, mean, 1.0), 0.0)
    if damp.device.type != "cpu" or bool((damp != 0).any()):
        chol, _ = _cholesky(gram_ + damp.unsqueeze(-1) * eye)
    keep = nonzero.unsqueeze(-1)
    return _inverse_from_cholesky(chol) * keep, chol * keep, damp * nonzero, singular


def _inverse_from_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ from the Cholesky factor L (``torch.cholesky_inverse``, 2-5x faster on the CPU
    than solving against I), written down for 1×1 matrices as ``_cholesky`` is: 1 / L²."""
    if chol.shape[-1] == 1:
        return 1 / chol.square()
    return torch.cholesky_inverse(chol)


def _cholesky(gram_: torch.Tensor):
    """``torch.linalg.cholesky_ex``, written down for 1×1 matrices (one per unit of a
    ``PositiveRescaling``; LAPACK's batch of them is thirty times slower): the root of a
    positive entry, and a failed pivot (info 1) elsewhere, NaN included."""
    if gram_.shape[-1] != 1:
        return torch.linalg.cholesky_ex(gram_)
    positive = gram_ > 0
    chol = torch.where(positive, gram_, 1.0).sqrt()
    return chol, (~positive).reshape(gram_.shape[:-2]).to(torch.int32)


def frame_from_grams(
    p: torch.Tensor, q: torch.Tensor, damping: float, spectral: bool = True, weighted: bool = True
):
    """The frame of a factored point from its Grams P = AᵀA, Q = BᵀB (distributed callers sum
    them over row shards first): eigendecompositions and pseudo-inverses (``spectral``), or
    Cholesky inverses (the undamped invariant metric). ``weighted=False`` (the Euclidean
    metric, whose projection needs only the eigendecompositions) skips the inverses and
    square-root factors."""
    if not spectral:
        inv_p, root_p, damp_p, low_p = _cholesky_inverse(p)
        inv_q, root_q, damp_q, low_q = _cholesky_inverse(q)
        return FactorFrame(p, q, inv_p, inv_q, root_p, root_q, damp_p, damp_q, low_p | low_q)
    evals, evecs = symmetric_eigh(torch.cat((p, q)))  # one batched call for both Grams
    (lam, mu), (u, v) = evals.chunk(2), evecs.chunk(2)
    return _spectral_frame(p, q, (lam, u), (mu, v), damping, weighted)


def grams_frame(p: torch.Tensor, q: torch.Tensor, scales_p, scales_q) -> FactorFrame:
    """The frame of a factored point whose geometry needs its Grams and nothing factorised
    (``RotaryQK``'s Euclidean metric, whose projection is diagonal in its planes):
    ``deficient`` flags the heads whose smallest scale — of ``scales_p`` or ``scales_q``
    (…, k), e.g. the squared norms of a factor's RoPE planes — is at round-off level of the
    largest (8·r·eps of the Grams' precision)."""
    r = p.shape[-1]
    deficient = _low(scales_p.amin(-1), scales_p.amax(-1), r)
    deficient |= _low(scales_q.amin(-1), scales_q.amax(-1), r)
    zero = p.new_zeros(p.shape[:-2] + (1,))
    return FactorFrame(p, q, None, None, None, None, zero, zero, deficient)


def _spectral_frame(p, q, eig_p, eig_q, damping: float, weighted: bool) -> FactorFrame:
    """The spectral frame from the Grams and their eigendecompositions (ascending): the
    dampings, the deficiency flags and, with ``weighted``, the inverses and square roots."""
    (lam, u), (mu, v) = eig_p, eig_q
    r = p.shape[-1]
    damp_p = damping * lam.sum(-1, keepdim=True) / r
    damp_q = damping * mu.sum(-1, keepdim=True) / r
    deficient = _low(lam[..., 0], lam[..., -1], r) | _low(mu[..., 0], mu[..., -1], r)
    if not weighted:
        return FactorFrame(p, q, None, None, None, None, damp_p, damp_q, deficient, lam, u, mu, v)
    return FactorFrame(
        p,
        q,
        pinv_spectrum(lam + damp_p, u),
        pinv_spectrum(mu + damp_q, v),
        u * (lam + damp_p).clamp_min(0).sqrt().unsqueeze(-2),
        v * (mu + damp_q).clamp_min(0).sqrt().unsqueeze(-2),
        damp_p,
        damp_q,
        deficient,
        lam,
        u,
        mu,
        v,
    )


def balanced_frame(s: torch.Tensor, damping: float, weighted: bool = True) -> FactorFrame:
    """The spectral frame of a *balanced* point, whose Grams are both diag(s) (s: (H, r),
    float64, descending — the singular values of M = ABᵀ), written down instead of
    factorised: λ = μ = s ascending, U = V = the reversing permutation. It equals
    ``frame_from_grams(diag(s), diag(s), damping, weighted=weighted)`` without its
    eigendecomposition (the dressed point's Grams are diag(s) up to the round-off of storing
    it in the parameters' precision)."""
    r = s.shape[-1]
    flip = torch.eye(r, dtype=s.dtype, device=s.device).flip(-1).expand(*s.shape[:-1], r, r)
    p = torch.diag_embed(s)
    return _spectral_frame(p, p, (s.flip(-1), flip), (s.flip(-1), flip), damping, weighted)


def merge_frames(keep: torch.Tensor, first: FactorFrame, second: FactorFrame) -> FactorFrame:
    """Per head: ``first``'s entries where ``keep`` (H,) is True, ``second``'s elsewhere."""

    def pick(a, b):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return a
        mask = keep.view(keep.shape + (1,) * (a.dim() - keep.dim()))
        return torch.where(mask, a, b)

    return FactorFrame(*(pick(a, b) for a, b in zip(first, second)))


def iterative_frame(p: torch.Tensor, q: torch.Tensor, metric: str) -> FactorFrame:
    """The frame of a factored point from its Grams by matmul-only iterations in their dtype
    (``manifolds.iterative``), for the Euclidean metric (a Sylvester solver) or the undamped
    invariant one (inverses and square-root factors R = G^½, so R Rᵀ = G). Heads outside the
    iterations' bound are flagged in ``fallback`` (and ``deficient``): never synchronises."""
    condition = supported_condition(p.dtype, p.shape[-1])
    zero = p.new_zeros(p.shape[:-2] + (1,))
    if metric == "euclidean":
        solver = SylvesterSolver(p, q, condition)
        missing = dict(inv_p=None, inv_q=None, root_p=None, root_q=None)  # the solver has them
        return FactorFrame(
            p,
            q,
            **missing,
            damp_p=zero,
            damp_q=zero,
            deficient=~solver.ok,
            sylvester=solver,
            fallback=~solver.ok,
        )
    root_p, inv_root_p, ok_p = roots(p, condition)
    root_q, inv_root_q, ok_q = roots(q, condition)
    failed = ~(ok_p & ok_q)
    inv_p, inv_q = sym(inv_root_p @ inv_root_p), sym(inv_root_q @ inv_root_q)
    return FactorFrame(p, q, inv_p, inv_q, root_p, root_q, zero, zero, failed, fallback=failed)


def warm_frame(p: torch.Tensor, q: torch.Tensor, u, v, age: int) -> FactorFrame:
    """The Euclidean metric's frame of a point with Grams ``p``, ``q`` (H, r, r) whose
    projection is solved in the eigenbases ``u``, ``v`` of an earlier exact frame, ``age``
    steps back (``EigenbasisSylvester``). ``deficient`` is read from the Rayleigh quotients
    on those bases (an upper bound on the smallest eigenvalue: a head that lost rank since is
    flagged at the next exact frame at the latest)."""
    solver = EigenbasisSylvester(p, q, u, v, age)
    (diag_p, diag_q), r = solver.diagonals, p.shape[-1]
    deficient = _low(diag_p.amin(-1), diag_p.amax(-1), r) | _low(
        diag_q.amin(-1), diag_q.amax(-1), r
    )
    zero = p.new_zeros(p.shape[:-2] + (1,))
    return FactorFrame(p, q, None, None, None, None, zero, zero, deficient, warm=solver)


def with_fallback(iterative: FactorFrame, exact: FactorFrame) -> FactorFrame:
    """``iterative`` with ``exact``'s entries on its ``fallback`` heads, in ``exact``'s dtype
    (float64 where the exact route needed it), and ``exact``'s eigendecompositions, which the
    projection uses on those heads; heads that did not fall back are not deficient."""
    dtype = exact.p.dtype
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    merged = merge_frames(~iterative.fallback, FactorFrame(*map(cast, iterative)), exact)
    deficient = exact.deficient & iterative.fallback
    return merged._replace(deficient=deficient, lam=exact.lam, u=exact.u, mu=exact.mu, v=exact.v)


def step_scale(data: FactorFrame, vv1, vv2, av1, bv2) -> torch.Tensor:
    """Per head the factor s ≤ 1 of the invariant metric's step bound (module docstring) from
    r×r products of the step V = (V₁, V₂): V₁ᵀV₁, V₂ᵀV₂, AᵀV₁ and BᵀV₂, in the frame's
    precision. ‖V₁Bᵀ + AV₂ᵀ‖² = tr(V₁ᵀV₁ Q) + tr(P V₂ᵀV₂) + 2 tr(V₁ᵀA V₂ᵀB) is the first-order
    change of M, ‖V₁V₂ᵀ‖² = tr(V₁ᵀV₁ V₂ᵀV₂) the second-order one."""
    trace = lambda x, y: (x * y.mT).sum((-2, -1))  # noqa: E731 - tr(x y)
    linear = trace(vv1, data.q) + trace(data.p, vv2) + 2 * trace(av1.mT, bv2.mT)
    quadratic = trace(vv1, vv2)
    lin, quad = linear.clamp_min(0).sqrt(), quadratic.clamp_min(0).sqrt()
    return torch.where(quad > 0.5 * lin, 0.5 * lin / quad.clamp_min(1e-300), 1.0)
