"""quotopt.dynamics: Hessians, symmetry-induced flat directions, conserved quantities.

All in float64 with fixed seeds. The analytic case is matrix factorisation
f(A, B) = ½‖A Bᵀ − M*‖² with A, B ∈ R^{d×r}: at an exact minimum the Hessian is JᵀJ with J the
differential of (A, B) ↦ A Bᵀ, whose kernel is exactly the GL(r) orbit's tangent space, so the
null space has dimension r² and nothing else is flat. The O(d) analogue is
f(T) = ¼‖T Tᵀ − K*‖² (rows of T in R^d) with null space so(d) of dimension d(d−1)/2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import manifolds as M
from quotopt.dynamics import (
    algebra_basis,
    analyse_flat_directions,
    balance_gap,
    dense_hessian,
    flat_directions,
    flatten,
    gauge_drift,
    head_imbalance,
    horizontal_basis,
    hvp,
    lanczos_extremes,
    orbit_dimension,
    unflatten,
    vertical_basis,
)

F64 = torch.float64


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _factorisation(bundle, point):
    """½‖A Bᵀ − M*‖² summed over heads, with M* the invariant of ``point`` (a minimum)."""
    target = bundle.invariants(point)[0].detach()
    return lambda *p: 0.5 * ((bundle.invariants(p)[0] - target) ** 2).sum()


def _nonquadratic(a, b):
    return (torch.tanh(a @ b.mT) ** 2).sum() + (a**3).sum() * b.sum()


def _grad(loss, point):
    leaves = tuple(t.detach().requires_grad_(True) for t in point)
    return torch.autograd.grad(loss(*leaves), leaves)


# ---- hessian.py ------------------------------------------------------------------------------
def test_flatten_unflatten_roundtrip(gen):
    tensors = (torch.randn(2, 3, generator=gen), torch.randn(4, generator=gen))
    vector = flatten(tensors)
    assert vector.shape == (10,)
    assert all(torch.equal(a, b) for a, b in zip(unflatten(vector, tensors), tensors))
    with pytest.raises(ValueError, match="10 entries"):
        unflatten(torch.zeros(9), tensors)


def test_hvp_equals_dense_hessian_times_vector(gen):
    params = (
        torch.randn(4, 2, generator=gen, dtype=F64),
        torch.randn(4, 2, generator=gen, dtype=F64),
    )
    vector = tuple(torch.randn(p.shape, generator=gen, dtype=F64) for p in params)
    hessian = dense_hessian(_nonquadratic, params)
    assert torch.allclose(hessian, hessian.mT, atol=0)
    assert torch.allclose(
        flatten(hvp(_nonquadratic, params, vector)),
        hessian @ flatten(vector),
        rtol=1e-12,
        atol=1e-12,
    )
    reference = torch.autograd.functional.hessian(
        lambda x: _nonquadratic(*unflatten(x, params)), flatten(params)
    )
    assert torch.allclose(hessian, 0.5 * (reference + reference.mT), rtol=1e-12, atol=1e-12)
    looped = dense_hessian(_nonquadratic, params, vectorize=False, chunk_size=3)
    assert torch.allclose(hessian, looped, rtol=1e-13, atol=1e-13)


def test_dense_hessian_rejects_too_many_params():
    params = (torch.zeros(6, 2, dtype=F64),)
    with pytest.raises(ValueError, match=r"12 parameters exceed max_params=10.*lanczos"):
        dense_hessian(lambda x: (x**2).sum(), params, max_params=10)


def test_dense_hessian_of_an_affine_loss_is_zero():
    params = (torch.ones(3, dtype=F64), torch.ones(2, dtype=F64))
    hessian = dense_hessian(lambda a, b: a.sum() + 2 * b.sum(), params)
    assert torch.equal(hessian, torch.zeros(5, 5, dtype=F64))


def test_lanczos_extremes_match_dense_eigenvalues(gen):
    params = (
        torch.randn(5, 2, generator=gen, dtype=F64),
        torch.randn(5, 2, generator=gen, dtype=F64),
    )
    exact = np.linalg.eigvalsh(dense_hessian(_nonquadratic, params).numpy())
    top = lanczos_extremes(_nonquadratic, params, k=3, which="LA")
    bottom, vectors = lanczos_extremes(
        _nonquadratic, params, k=2, which="SA", return_eigenvectors=True
    )
    np.testing.assert_allclose(top, exact[-3:], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bottom, exact[:2], rtol=1e-9, atol=1e-9)
    for value, vector in zip(bottom, vectors):
        residual = flatten(hvp(_nonquadratic, params, vector)) - value * flatten(vector)
        assert float(residual.norm()) < 1e-8 * abs(exact).max()
    with pytest.raises(ValueError, match="1 <= k < n = 20"):
        lanczos_extremes(_nonquadratic, params, k=20)


# ---- flat.py: the analytic GL(r) case --------------------------------------------------------
@pytest.mark.parametrize("complement", ["euclidean", "metric"])
@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_factorisation_minimum_null_space_is_the_orbit(gen, complement, metric):
    d, r = 5, 2
    bundle = M.HeadQK(1, d, r, metric=metric)
    point = bundle.random_point(generator=gen, dtype=F64)
    report = analyse_flat_directions(
        _factorisation(bundle, point), bundle, point, complement=complement
    )
    assert report.n_params == 2 * d * r
    assert report.grad_norm == 0.0
    assert report.orbit_dim == r * r == bundle.group_dim
    assert report.flat_total == r * r
    assert report.flat_horizontal == 0
    assert report.symmetry_flat == report.orbit_dim
    assert np.abs(report.vertical_rayleigh).max() < 1e-12
    assert len(report.horizontal_eigenvalues) == 2 * d * r - r * r


def test_factorisation_minimum_two_value_output_heads(gen):
    bundle = M.HeadOV(2, 4, 2)
    point = bundle.random_point(generator=gen, dtype=F64)
    report = analyse_flat_directions(_factorisation(bundle, point), bundle, point)
    assert (report.orbit_dim, report.flat_total, report.flat_horizontal) == (8, 8, 0)


def test_vertical_directions_not_null_away_from_a_critical_point(gen):
    """vᵀHv = −⟨∇f, d²/dt² p·exp(tξ)⟩ = −⟨∇f, (Aξ², B(ξᵀ)²)⟩ for v = (Aξ, −Bξᵀ)."""
    bundle = M.HeadQK(1, 5, 2)
    point = bundle.random_point(generator=gen, dtype=F64)
    other = bundle.random_point(generator=gen, dtype=F64)  # M* of another orbit
    loss = _factorisation(bundle, other)
    report = analyse_flat_directions(loss, bundle, point)
    assert report.grad_norm > 1e-2
    assert np.abs(report.vertical_rayleigh).max() > 1e-3
    hessian, (ga, gb) = dense_hessian(loss, point), _grad(loss, point)
    a, b = point
    for xi in algebra_basis(bundle, dtype=F64):
        v = flatten(bundle.vertical(point, xi))
        curvature = (ga * (a @ xi @ xi)).sum() + (gb * (b @ xi.mT @ xi.mT)).sum()
        assert torch.allclose(v @ hessian @ v, -curvature, rtol=1e-10, atol=1e-12)


# ---- flat.py: O(d) ------------------------------------------------------------------------------
def test_rotation_gram_loss_orbit(gen):
    d, m = 4, 6
    bundle = M.ResidualRotation(d, (1,), shapes=((m, d),))
    point = bundle.random_point(generator=gen, dtype=F64)
    target = (point[0] @ point[0].mT).detach()
    report = analyse_flat_directions(
        lambda t: 0.25 * ((t @ t.mT - target) ** 2).sum(), bundle, point
    )
    assert report.orbit_dim == report.flat_total == d * (d - 1) // 2
    assert report.flat_horizontal == 0
    assert np.abs(report.vertical_rayleigh).max() < 1e-12


def test_orbit_dimension_drops_at_a_stabiliser(gen):
    d = 4
    bundle = M.ResidualRotation(d, (1,), shapes=((6, d),))
    (t,) = bundle.random_point(generator=gen, dtype=F64)
    assert orbit_dimension(bundle, (t,)) == bundle.group_dim == 6
    t[:, 2:] = 0.0  # rows span a plane: its stabiliser O(2) has dimension 1
    assert orbit_dimension(bundle, (t,)) == 5
    assert horizontal_basis(bundle, (t,)).shape == (24, 24 - 5)


def test_product_bundle_bases(gen):
    bundle = M.ProductBundle(
        [M.HeadQK(2, 3, 2, metric="invariant"), M.ResidualRotation(3, (0,), shapes=((3, 2),))]
    )
    point = bundle.random_point(generator=gen, dtype=F64)
    vertical = vertical_basis(bundle, point)
    assert vertical.shape == (30, bundle.group_dim) == (30, 11)
    assert orbit_dimension(bundle, point) == 11
    for complement in ("euclidean", "metric"):
        q = horizontal_basis(bundle, point, complement)
        assert q.shape == (30, 19)
        assert torch.allclose(q.mT @ q, torch.eye(19, dtype=F64), atol=1e-12)
        assert torch.linalg.matrix_rank(torch.cat([q, vertical], 1)) == 30


def test_flat_report_to_dict_is_json(gen):
    hessian = torch.diag(torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=F64))
    vertical = torch.eye(4, dtype=F64)[:, :1]
    report = flat_directions(hessian, vertical, rel_tol=1e-8)
    assert (report.flat_total, report.flat_horizontal, report.orbit_dim) == (2, 1, 1)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["tolerance_rule"].startswith("|λ| ≤ 1e-08")
    assert data["eigenvalues"] == [0.0, 0.0, 1.0, 2.0]


def test_algebra_basis_rejects_unknown_algebras():
    class Odd:
        algebra_shape, group_dim = (3,), 2

    with pytest.raises(ValueError, match="cannot infer a Lie-algebra basis"):
        algebra_basis(Odd())


# ---- conserved.py ----------------------------------------------------------------------------
def _descend(loss, point, eta: float, time: float):
    for _ in range(round(time / eta)):
        point = tuple(p - eta * g for p, g in zip(point, _grad(loss, point)))
    return point


@pytest.mark.parametrize("cls", [M.HeadQK, M.HeadOV])
def test_head_imbalance_is_conserved_by_gradient_flow(gen, cls):
    bundle = cls(2, 4, 2)
    point = bundle.random_point(generator=gen, dtype=F64)
    target = torch.randn(2, 4, 4, generator=gen, dtype=F64)

    def loss(*p):
        return 0.5 * ((torch.tanh(bundle.invariants(p)[0]) - target) ** 2).sum()

    start = head_imbalance(bundle, point, matrices=True)
    assert torch.allclose(head_imbalance(bundle, point), torch.linalg.matrix_norm(start))
    drift = []
    for eta in (4e-3, 2e-3):
        end = _descend(loss, point, eta, time=0.5)
        drift.append(
            float(
                torch.linalg.matrix_norm(head_imbalance(bundle, end, matrices=True) - start).max()
            )
        )
        assert float((bundle.invariants(end)[0] - bundle.invariants(point)[0]).norm()) > 1.0
    assert drift[0] < 0.05 and 1.8 < drift[0] / drift[1] < 2.2  # O(η): gradient descent
    # a term that is not GL-invariant moves the imbalance at O(1)
    end = _descend(lambda a, b: loss(a, b) + 0.5 * (a**2).sum(), point, 2e-3, time=0.5)
    assert (
        float(torch.linalg.matrix_norm(head_imbalance(bundle, end, matrices=True) - start).max())
        > 1.0
    )


@pytest.mark.parametrize("cls", [M.HeadQK, M.HeadOV])
def test_gauge_drift_and_balance_gap_on_heads(gen, cls):
    bundle = cls(3, 5, 2)
    point = bundle.random_point(generator=gen, dtype=F64)
    dressed = bundle.dress(point)
    assert gauge_drift(bundle, dressed).shape == (3,)
    assert float(gauge_drift(bundle, dressed).max()) < 1e-12
    assert float(balance_gap(bundle, dressed).max()) < 1e-12
    moved = bundle.act(dressed, bundle.random_group_element(generator=gen, dtype=F64))
    assert float(gauge_drift(bundle, moved).min()) > 1e-2
    assert float(balance_gap(bundle, moved).min()) > 1e-2
    rotation = M.base.random_orthogonal((3,), 2, gen, F64)
    rotated = bundle.act(dressed, rotation)
    assert float(balance_gap(bundle, rotated).max()) < 1e-12  # balanced set = dress(p)·O(r)
    assert float(gauge_drift(bundle, rotated).min()) > 1e-2


def test_gauge_drift_rotation_and_product(gen):
    rotation = M.ResidualRotation(3, (1,), shapes=((5, 3),))
    bundle = M.ProductBundle([M.HeadQK(1, 3, 2), rotation])
    point = bundle.random_point(generator=gen, dtype=F64)
    dressed = bundle.dress(point)
    heads, rot = gauge_drift(bundle, dressed)
    assert heads.shape == (1,) and rot.shape == ()
    assert max(float(heads.max()), float(rot)) < 1e-12
    assert float(balance_gap(rotation, dressed[2:])) < 1e-12
    moved = rotation.act(dressed[2:], rotation.random_group_element(generator=gen, dtype=F64))
    assert float(gauge_drift(rotation, moved)) > 1e-2
    assert float(balance_gap(rotation, moved)) > 1e-2
    with pytest.raises(ValueError, match="head bundles"):
        head_imbalance(rotation, moved)
