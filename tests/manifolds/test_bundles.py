"""Conformance matrix: every bundle through the same property checks (manifolds.testing).

Tolerances (relative): 1e-9 in float64, 2e-3 in float32 (manifolds.testing.DEFAULT_TOLERANCES),
for points whose factors have condition number ≤ 4 and group elements of condition 10. The
finite-difference check of ``vertical`` uses a central difference that moves the point by a
fraction 1e-5 (float64) or 1e-2 (float32) of its size, whatever the size of ξ, so that its
round-off and truncation errors (≈ 1e-11 resp. 2e-4) sit inside those tolerances.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manifolds as M
from manifolds.testing import assert_bundle, relative_error
from tests.cases import CASES, strategy

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


_DRAW = {case.name: case.draw for case in CASES}


def head_bundles():
    return st.one_of(_DRAW["HeadQK"](), _DRAW["HeadOV"]())


def residual_bundles():
    return _DRAW["ResidualRotation"]()


def rescaling_bundles():
    return _DRAW["PositiveRescaling"]()


bundles = strategy()  # every case of tests/cases.py, and products of them


@SETTINGS
@given(bundle=bundles, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(["f64", "f32"]))
def test_conformance(bundle, seed, dtype):
    dtype = {"f64": torch.float64, "f32": torch.float32}[dtype]
    assert_bundle(bundle, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@SETTINGS
@given(
    bundle=head_bundles().map(lambda b: b.with_geometry("iterative")),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(["f64", "f32"]),
)
def test_conformance_of_the_matmul_only_head_route(bundle, seed, dtype):
    """The head pairs with ``geometry="iterative"`` pass the same conformance checks."""
    dtype = {"f64": torch.float64, "f32": torch.float32}[dtype]
    assert_bundle(bundle, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conformance_of_a_discrete_group(dtype):
    """O(1) has the zero algebra: the finite-difference check of ``vertical`` must not divide
    by its zero size (it gave NaN in float32, where 1e-2/1e-300 overflows)."""
    bundle = M.ResidualRotation(1, (0, -1), shapes=((1, 3), (2, 1)))
    assert bundle.group_dim == 0
    assert_bundle(bundle, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("seed", [110, 133])
def test_vertical_fd_is_exact_to_round_off_for_a_small_algebra_element(seed):
    """r = 1 heads whose random ξ is small: a fixed step 1e-5 in t left round-off
    eps/(1e-5·|ξ|) of 5e-9 and 1.4e-8 at these seeds; a step scaled by 1/‖ξ‖ keeps ≈ 1e-11."""
    bundle = M.HeadQK(1, 2, 1)
    errors = assert_bundle(bundle, generator=torch.Generator().manual_seed(seed))
    assert errors["vertical_fd"] <= 1e-10


@SETTINGS
@given(bundle=bundles, seed=st.integers(0, 2**31 - 1))
def test_riemannian_gradient_represents_the_differential(bundle, seed):
    """⟨rgrad, v⟩_metric = ⟨egrad, v⟩_Euclidean for every v."""
    gen = torch.Generator().manual_seed(seed)
    p = bundle.random_point(generator=gen, dtype=torch.float64)
    egrad, v = bundle.random_tangent(p, generator=gen), bundle.random_tangent(p, generator=gen)
    lhs = bundle.inner(p, bundle.riemannian_gradient(p, egrad), v)
    rhs = sum((a * b).sum() for a, b in zip(egrad, v))
    scale = sum(float(a.norm() * b.norm()) for a, b in zip(egrad, v))
    assert abs(float(lhs - rhs)) <= 1e-10 * scale


@SETTINGS
@given(bundle=head_bundles(), seed=st.integers(0, 2**31 - 1))
def test_gradient_of_invariant_loss_is_horizontal(bundle, seed):
    """For f(M) = ⟨C, M⟩ the gradient (C B, Cᵀ A) is horizontal under both metrics."""
    gen = torch.Generator().manual_seed(seed)
    p = bundle.random_point(generator=gen, dtype=torch.float64)
    point = tuple(t.clone().requires_grad_() for t in p)
    c = torch.randn(bundle.d_model, bundle.d_model, generator=gen, dtype=torch.float64)
    (bundle.invariants(point)[0] * c).sum().backward()
    rgrad = bundle.riemannian_gradient(p, tuple(t.grad for t in point))
    vertical_part = bundle.project_vertical(p, rgrad)
    assert float(bundle.norm(p, vertical_part)) <= 1e-10 * float(bundle.norm(p, rgrad))


@SETTINGS
@given(bundle=head_bundles(), seed=st.integers(0, 2**31 - 1))
def test_dressed_heads_are_balanced(bundle, seed):
    """p·u(p) has AᵀA = BᵀB = diag(S) with S descending."""
    gen = torch.Generator().manual_seed(seed)
    a, b = bundle.factors(bundle.dress(bundle.random_point(generator=gen, dtype=torch.float64)))
    ga, gb = a.mT @ a, b.mT @ b
    s = torch.diagonal(ga, dim1=-2, dim2=-1)
    assert relative_error(ga, gb) <= 1e-10
    assert relative_error(ga, torch.diag_embed(s)) <= 1e-10
    assert bool((s[..., :-1] >= s[..., 1:]).all())


@SETTINGS
@given(bundle=residual_bundles(), seed=st.integers(0, 2**31 - 1))
def test_dressed_residual_is_in_its_eigenframe(bundle, seed):
    gen = torch.Generator().manual_seed(seed)
    dressed = bundle.dress(bundle.random_point(generator=gen, dtype=torch.float64))
    c = bundle._cross(dressed, dressed)
    off_diagonal = c - torch.diag_embed(torch.diagonal(c))
    assert float(off_diagonal.norm()) <= 1e-10 * float(c.norm())


@SETTINGS
@given(bundle=head_bundles(), seed=st.integers(0, 2**31 - 1))
def test_head_layouts_share_one_geometry(bundle, seed):
    """HeadOV is HeadQK with B = Woᵀ: every operation agrees after transposition."""
    qk = M.HeadQK(bundle.n_heads, bundle.d_model, bundle.d_head, metric=bundle.metric)
    ov = M.HeadOV(bundle.n_heads, bundle.d_model, bundle.d_head, metric=bundle.metric)
    gen = torch.Generator().manual_seed(seed)
    a, b = qk.random_point(generator=gen, dtype=torch.float64)
    z = qk.random_tangent((a, b), generator=gen)
    g = qk.random_group_element(generator=gen, dtype=torch.float64)
    h_qk, h_ov = qk.project_horizontal((a, b), z), ov.project_horizontal((a, b.mT), (z[0], z[1].mT))
    assert relative_error((h_ov[0], h_ov[1].mT), h_qk) <= 1e-12
    act_ov = ov.act((a, b.mT), g)
    assert relative_error((act_ov[0], act_ov[1].mT), qk.act((a, b), g)) <= 1e-12
    assert relative_error(ov.invariants((a, b.mT)), qk.invariants((a, b))) <= 1e-12


@SETTINGS
@given(bundle=rescaling_bundles(), seed=st.integers(0, 2**31 - 1))
def test_rescaling_dressing_balances_without_flipping_signs(bundle, seed):
    """ReLU (ReLUᵏ) units are balanced, ‖a‖² = k‖b‖², by a positive scale only: relu(-z) ≠
    -relu(z)."""
    gen = torch.Generator().manual_seed(seed)
    p = bundle.random_point(generator=gen, dtype=torch.float64)
    u = bundle.dressing(p)
    assert bool((u > 0).all())
    a, b = bundle.dress(p)
    root_k = bundle.degree**0.5
    assert relative_error(a.norm(dim=(-2, -1)), root_k * b.norm(dim=(-2, -1))) <= 1e-12


def test_ambiguity_flagged_near_degenerate_heads():
    """Head 0 has M with two equal singular values (a rotation is left free); head 1 not."""
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(2, 5, 5, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor([[2.0, 2.0 * (1 + 1e-9)], [2.0, 1.0]], dtype=torch.float64)
    a, b = q[..., :2] * s.sqrt().unsqueeze(-2), q[..., 2:4] * s.sqrt().unsqueeze(-2)
    bundle = M.HeadQK(2, 5, 2)
    assert bundle.is_ambiguous((a, b)).tolist() == [True, False]
    generic = bundle.random_point(generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert not bool(bundle.is_ambiguous(generic).any())


def test_ambiguity_flagged_for_isotropic_residual_point():
    bundle = M.ResidualRotation(3, (1,))
    isotropic = (torch.eye(3, dtype=torch.float64),)
    assert bool(bundle.is_ambiguous(isotropic))
    generic = (torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),)
    assert not bool(bundle.is_ambiguous(generic))


def test_sign_convention_is_deterministic():
    """Dressed first-factor columns have their largest-|entry| positive."""
    bundle = M.HeadQK(3, 6, 3)
    p = bundle.random_point(generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = bundle.dress(p)[0]
    top = torch.gather(a, -2, a.abs().argmax(dim=-2, keepdim=True))
    assert bool((top > 0).all())


# ---- bad input ---------------------------------------------------------------------------


def test_wrong_shapes_name_expected_and_given():
    bundle = M.HeadQK(4, 8, 2)
    good = bundle.random_point(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"point\[1\] has shape \(3, 8, 2\), expected \(4, 8, 2\)"):
        bundle.project_horizontal((good[0], good[1][:3]), good)
    with pytest.raises(ValueError, match=r"tuple of 2 tensors"):
        bundle.dress(good[:1])
    with pytest.raises(
        ValueError, match=r"group element must have shape \(4, 2, 2\), got \(2, 2\)"
    ):
        bundle.act(good, torch.eye(2, dtype=torch.float64))
    residual = M.ResidualRotation(5, (1,))
    with pytest.raises(ValueError, match=r"axis 1 has size d_model=5"):
        residual.project_horizontal((torch.zeros(3, 4),), (torch.zeros(3, 4),))


def test_wrong_dtypes_and_mixed_devices_are_rejected():
    bundle = M.HeadQK(1, 3, 1)
    with pytest.raises(ValueError, match="floating-point"):
        bundle.invariants((torch.zeros(1, 3, 1, dtype=torch.long),) * 2)
    with pytest.raises(ValueError, match=r"point\[1\] is torch.float32"):
        bundle.invariants((torch.zeros(1, 3, 1, dtype=torch.float64), torch.zeros(1, 3, 1)))
    p = bundle.random_point(dtype=torch.float64)
    with pytest.raises(ValueError, match="tangent is torch.float32"):
        bundle.project_horizontal(p, tuple(t.float() for t in p))


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="d_head .* must not exceed d_model"):
        M.HeadQK(2, 3, 4)
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        M.HeadOV(0, 3, 1)
    with pytest.raises(ValueError, match="metric must be one of"):
        M.HeadQK(1, 3, 1, metric="balanced-ish")
    with pytest.raises(ValueError, match="has no axis 0 of size d_model=4"):
        M.ResidualRotation(4, (0,), shapes=((3, 4),))


def _rank_deficient_point():
    bundle_point = M.HeadQK(3, 6, 3).random_point(dtype=torch.float64)
    a = bundle_point[0].clone()
    a[1, :, 2] = 2.0 * a[1, :, 0]  # head 1 of Wq has rank 2
    return a, bundle_point[1]


@pytest.mark.parametrize("method", ["dressing", "dress", "ambiguity"])
def test_rank_drop_in_dressing_names_head_and_rank(method):
    bundle = M.HeadQK(3, 6, 3)
    with pytest.raises(
        ValueError, match=r"dressing needs full rank d_head=3, but head 1 of Wq has rank 2"
    ):
        getattr(bundle, method)(_rank_deficient_point())


def test_rank_drop_in_invariant_metric_names_head_and_rank():
    bundle = M.HeadQK(3, 6, 3, metric="invariant")
    p = _rank_deficient_point()
    with pytest.raises(
        ValueError, match=r"invariant metric needs full rank .* head 1 of Wq has rank 2"
    ):
        bundle.project_horizontal(p, p)
    with pytest.raises(ValueError, match="head 1"):
        bundle.riemannian_gradient(p, p)


def test_rank_drop_under_euclidean_metric_stays_finite():
    """The Sylvester solve is a pseudo-inverse: a stabiliser direction gets zero, no NaN."""
    bundle = M.HeadQK(3, 6, 3)
    p = _rank_deficient_point()
    h = bundle.project_horizontal(p, p)
    assert all(bool(torch.isfinite(t).all()) for t in h)
    assert relative_error(bundle.project_horizontal(p, h), h) <= 1e-10


def test_unchecked_skips_the_synchronising_rank_checks():
    bundle = M.HeadQK(3, 6, 3, metric="invariant")
    p = _rank_deficient_point()
    with M.unchecked():
        assert not M.checks_enabled()
        bundle.project_horizontal(p, p)  # no ValueError: the optimiser's guard handles it
    assert M.checks_enabled()


def test_low_precision_inputs_are_supported():
    """bf16 points go through the same code (small solves run in float32) and stay close."""
    bundle = M.HeadQK(2, 16, 4, metric="invariant")
    p = bundle.random_point(generator=torch.Generator().manual_seed(0))
    v = bundle.random_tangent(p, generator=torch.Generator().manual_seed(1))
    exact = bundle.project_horizontal(p, v)
    low = bundle.project_horizontal(tuple(t.bfloat16() for t in p), tuple(t.bfloat16() for t in v))
    assert low[0].dtype == torch.bfloat16
    assert relative_error(low, exact) <= 5e-2
    assert bundle.dress(tuple(t.bfloat16() for t in p))[0].dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "bundle",
    [
        M.HeadQK(4, 32, 8, "invariant"),
        M.HeadOV(4, 32, 8),
        M.ResidualRotation(16, (1, 0), shapes=((40, 16), (16, 8))),
    ],
)
def test_cuda_matches_cpu(bundle):
    p = bundle.random_point(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = bundle.random_tangent(p, generator=torch.Generator().manual_seed(1))
    cuda = lambda xs: tuple(x.cuda() for x in xs)  # noqa: E731
    assert_bundle(bundle, generator=torch.Generator().manual_seed(2), device="cuda")
    on_gpu = bundle.project_horizontal(cuda(p), cuda(v))
    assert relative_error(tuple(t.cpu() for t in on_gpu), bundle.project_horizontal(p, v)) <= 1e-10
    assert relative_error(tuple(t.cpu() for t in bundle.dress(cuda(p))), bundle.dress(p)) <= 1e-8


# ---- the closed-form redress of the head bundles ------------------------------------------------


@pytest.mark.parametrize("cls", [M.HeadQK, M.HeadOV])
@pytest.mark.parametrize(
    "metric, damping", [("euclidean", 0.0), ("invariant", 0.0), ("invariant", 0.1)]
)
def test_head_redress_equals_the_generic_redress(cls, metric, damping):
    """``GeneralLinearPair.redress`` (u⁻ᵀ from the dressing, the dressed frame written down)
    against ``Bundle.redress`` (solves and a fresh factorisation), float64, with one head made
    rank-deficient where the metric allows it (it only has its signs fixed, and keeps its
    frame conjugated by them): the dressed point, the carried
    gradient and tangents to 1e-12, and everything computed from the frame — the horizontal
    projection, the Riemannian gradient, the second moments — to 1e-10. The control: the
    point before dressing, whose frame differs."""
    gen = torch.Generator().manual_seed(4)
    bundle = cls(3, 6, 3, metric, damping=damping)
    point = bundle.random_point(generator=gen, dtype=torch.float64)
    a, b = bundle.factors(point)
    if metric == "euclidean" or damping:  # the undamped invariant metric refuses rank drops
        a = a.clone()
        a[1, :, 2] = a[1, :, 0]  # head 1: rank 2 < r, not dressable
        point = bundle.from_factors(a, b)
    grad = bundle.random_tangent(point, generator=gen)
    tangents = (bundle.random_tangent(point, generator=gen),)
    fast_at, *fast = bundle.at(point, bundle.factorise(point)).redressed(grad, tangents)
    slow = M.Bundle._redress(bundle, bundle.at(point), grad, tangents, ())
    fast = (fast_at.point, *fast)
    for x, y in ((fast[0], slow[0]), (fast[1], slow[1]), (fast[2][0], slow[2][0])):
        assert relative_error(x, y) <= 1e-12
    moved, v = slow[0], bundle.random_tangent(slow[0], generator=gen)
    slow_at = bundle.at(moved, slow[4])
    for op in ("horizontal", "riemannian_gradient", "mean_square"):
        assert relative_error(getattr(fast_at, op)(v), getattr(slow_at, op)(v)) <= 1e-10, op
    before = bundle.at(moved, bundle.factorise(point))  # the control: a frame of another point
    assert relative_error(before.horizontal(v), slow_at.horizontal(v)) > 1e-3


def test_product_redress_is_each_components_redress():
    """A product re-dresses component by component (the head's closed form, the rescaling's
    generic path) and agrees with the generic redress of the whole (1e-12 / 1e-10, float64)."""
    gen = torch.Generator().manual_seed(5)
    bundle = M.ProductBundle([M.HeadOV(2, 5, 2), M.PositiveRescaling(3, 4, 4)])
    point = bundle.random_point(generator=gen, dtype=torch.float64)
    grad = bundle.random_tangent(point, generator=gen)
    tangents = (bundle.random_tangent(point, generator=gen),) * 2
    fast_at, *fast = bundle.at(point).redressed(grad, tangents)
    fast = (fast_at.point, *fast, fast_at.data)
    slow = M.Bundle._redress(bundle, bundle.at(point), grad, tangents, ())
    slow = (*slow[:3], slow[4])
    assert relative_error(fast[0], slow[0]) <= 1e-12 and relative_error(fast[1], slow[1]) <= 1e-12
    assert all(relative_error(x, y) <= 1e-12 for x, y in zip(fast[2], slow[2]))
    v = bundle.random_tangent(slow[0], generator=gen)
    assert (
        relative_error(
            bundle.at(slow[0], fast[3]).horizontal(v),
            bundle.at(slow[0], slow[3]).horizontal(v),
        )
        <= 1e-10
    )
