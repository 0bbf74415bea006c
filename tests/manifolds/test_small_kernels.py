"""The hand-written forms of small kernels agree with the general ones they replace: the RoPE
commutant's plane system (a 2 × 2-block contraction), the 1 × 1 Cholesky of the units' frames,
the r = 1 products, and the gradient's mean squares without the metric's root (float64, to
round-off)."""

import pytest
import torch

import manifolds as M
from manifolds.frames import _cholesky, _cholesky_inverse, _inverse_from_cholesky
from manifolds.linalg import cross, times
from manifolds.rotary import RotaryQK
from manifolds.rotary_blocks import _basis, _plane_system


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_plane_system_is_the_block_contraction(pairing):
    bundle = RotaryQK(3, 32, 8, pairing=pairing)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 32, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    p = x.mT @ x
    q = y.mT @ y + 0.3 * torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)  # Q ≠ Qᵀ
    basis = _basis(p)
    pb, qb = bundle._plane_blocks(p), bundle._plane_blocks(q)
    # 2 tr(E_s P_ij E_t Q_ji), written as the contraction of the blocks
    reference = 2 * torch.einsum("sac,hiajb,tbe,hjeic->hisjt", basis, pb, basis, qb)
    system = _plane_system(bundle._block_entries(p), bundle._block_entries(q.mT))
    torch.testing.assert_close(system, reference, rtol=1e-13, atol=1e-13)
    # control: Q in place of Qᵀ is another system when Q is not symmetric
    other = _plane_system(bundle._block_entries(p), bundle._block_entries(q))
    assert (other - reference).abs().max() > 1e-3


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_the_frames_plane_system_serves_every_projection_at_its_point(pairing):
    """Invariant metric: the frame holds the Cholesky factor of the plane system at its Grams
    (``FactorFrame.system``), and a projection with it equals one that factorises the system
    afresh, to 1e-12 in float64, and is horizontal there; the control — the factor of another
    point's system — gives another projection."""
    bundle = RotaryQK(3, 12, 8, "invariant", pairing=pairing, factor_rows=(12, 10))
    gen = torch.Generator().manual_seed(1)
    point = bundle.random_point(generator=gen, dtype=torch.float64, condition=10.0)
    other = bundle.random_point(generator=gen, dtype=torch.float64, condition=10.0)
    z = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in point)
    frame = bundle.at(point)
    assert frame.data.system is not None
    cached = frame.horizontal(z)
    fresh = bundle.at(point, frame.data._replace(system=None)).horizontal(z)
    for got, want in zip(cached, fresh):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(bundle.at(point).vertical_part(cached)[0].abs().max()) < 1e-12
    stale = frame.data._replace(system=bundle.at(other).data.system)
    wrong = bundle.at(point, stale).horizontal(z)
    assert max(float((w - c).abs().max()) for w, c in zip(wrong, cached)) > 1e-3


def test_one_by_one_cholesky_matches_lapack():
    grams = torch.tensor([4.0, 1e-300, 0.0, 2.5, float("nan")], dtype=torch.float64)
    grams = grams.view(-1, 1, 1)
    chol, info = _cholesky(grams)
    ref, ref_info = torch.linalg.cholesky_ex(grams[:4])
    torch.testing.assert_close(chol[:4][ref_info == 0], ref[ref_info == 0], rtol=0, atol=0)
    assert info[:4].tolist() == [int(i > 0) for i in ref_info.tolist()]
    assert info[4] > 0  # NaN: a failed pivot
    good = ref_info == 0  # the written-down inverse against LAPACK's on the same factors
    torch.testing.assert_close(
        _inverse_from_cholesky(ref[good]), torch.cholesky_inverse(ref[good]), rtol=1e-15, atol=0
    )
    # the frame's parts, on their definition: G⁻¹ and √G, zero on the zero Gram (flagged)
    inverse, root, damp, singular = _cholesky_inverse(grams[:4])
    positive = grams[:4] > 0
    torch.testing.assert_close(
        inverse, torch.where(positive, 1 / grams[:4], 0.0), rtol=1e-15, atol=0
    )
    torch.testing.assert_close(root, grams[:4].sqrt(), rtol=1e-15, atol=0)
    assert singular.tolist() == [False, False, True, False]
    assert (damp == 0).all()


def test_single_column_products_match_matmul():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 7, 1, generator=gen, dtype=torch.float64)
    m = torch.randn(5, 1, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(times(x, m), x @ m, rtol=1e-15, atol=0)
    torch.testing.assert_close(cross(x, y), x.mT @ y, rtol=1e-14, atol=1e-15)
    wide = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64)
    square = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64)
    assert torch.equal(times(wide, square), wide @ square)
    assert torch.equal(cross(wide, wide), wide.mT @ wide)


_GRADIENT_BUNDLES = {
    "HeadQK": lambda m: M.HeadQK(3, 12, 4, m),
    "HeadOV damped": lambda m: M.HeadOV(3, 12, 4, m, damping=0.1 * (m == "invariant")),
    "HeadQK iterative": lambda m: M.HeadQK(3, 12, 4, m, geometry="iterative"),
    "RotaryQK": lambda m: M.RotaryQK(3, 12, 4, m, factor_rows=(12, 6)),
    "PositiveRescaling": lambda m: M.PositiveRescaling(5, 7, 3, m),
    "PositiveRescaling k=2": lambda m: M.PositiveRescaling(5, 7, 3, m, degree=2),
}


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
@pytest.mark.parametrize("name", sorted(_GRADIENT_BUNDLES))
def test_gradient_and_moments_are_the_gradient_and_its_mean_squares(name, metric):
    """``Frame.gradient_and_moments`` (the factored bundles' invariant metric: the mean squares
    as rowsum(u ∘ g), no root product) equals the Riemannian gradient and its
    ``mean_square`` to 1e-12 relative in float64; the control — the mean squares of the
    Euclidean gradient instead — misses by more than 1e-2."""
    bundle = _GRADIENT_BUNDLES[name](metric)
    gen = torch.Generator().manual_seed(0)
    point = bundle.random_point(generator=gen, dtype=torch.float64, condition=10.0)
    egrad = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in point)
    frame = bundle.at(point)
    rgrad, moments = frame.gradient_and_moments(egrad)
    reference = frame.riemannian_gradient(egrad)
    for got, want in zip(rgrad + moments, reference + frame.mean_square(reference)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    if metric == "invariant":
        wrong = frame.mean_square(egrad)
        assert max(float((w - m).norm() / m.norm()) for w, m in zip(wrong, moments)) > 1e-2
