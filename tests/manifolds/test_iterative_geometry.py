"""The matmul-only head geometry (``geometry="iterative"``, ``manifolds.iterative``).

Its kernels agree with the exact factorisations inside their bound and flag every head outside
it; its frames give the exact route's projections, gradients, second moments and balanced
points on random points of condition 1 to 1e4 and fall back (flagged) beyond; and on it
QuotientAdam (both metrics) and QuotientMuon stay gauge-equivariant: runs from p and from p·g
(condition 100) give one function after 150 float64 steps, where AdamW and the undressed
Euclidean QuotientAdam (controls) do not.
"""

from __future__ import annotations

import pytest
import torch

import manifolds as M
import quotopt
from manifolds import iterative
from quotopt import QuotientAdam, QuotientMuon
from quotopt.groups import use_geometry
from tests.optim.test_stacked_step import _orbit_gap

F64 = torch.float64
CONDITIONS = (1.0, 1e2, 1e4)  # of the factors: their Grams reach 1e8, the float64 bound


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _spd(h, r, condition, dtype=F64, seed=0):
    """(h, r, r) symmetric positive definite with eigenvalues log-spaced in [1, condition]."""
    q, _ = torch.linalg.qr(torch.randn(h, r, r, generator=_gen(seed), dtype=F64))
    s = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), r, dtype=F64)
    return ((q * s) @ q.mT).to(dtype)


def _rel(x, y) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


# ---- the kernels ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-8), (torch.float32, 1e-3)])
def test_the_kernels_agree_with_eigendecompositions_inside_their_bound(dtype, tol):
    """Gram conditions up to the bound (1e8 in float64, 1.6e4 in float32 at r = 16): square
    roots, Sylvester solutions and the balancing element to ``tol`` relative (measured at most
    2e-9 and 1e-5), none flagged."""
    r = 16
    bound = iterative.supported_condition(dtype, r)
    for condition in (1.0, bound**0.5, bound):
        p, q = _spd(3, r, condition, dtype), _spd(3, r, condition, dtype, seed=1)
        lam, u = torch.linalg.eigh(p.double())
        root, inv_root, ok = iterative.roots(p, bound)
        assert bool(ok.all())
        assert _rel(root, (u * lam.sqrt().unsqueeze(-2)) @ u.mT) <= tol
        assert _rel(inv_root, (u / lam.sqrt().unsqueeze(-2)) @ u.mT) <= tol
        c = torch.randn(3, r, r, generator=_gen(2), dtype=dtype)
        solver = iterative.SylvesterSolver(p, q, bound)
        assert bool(solver.ok.all())
        exact = M.linalg.solve_sylvester_spd(p.double(), q.double(), c.double())
        assert _rel(solver.solve(c), exact) <= tol
        g, g_inv_t, ok = iterative.balancing(p, q, bound)
        assert bool(ok.all())
        balanced = (g.mT @ p @ g).double()
        assert _rel(g_inv_t.mT @ q @ g_inv_t, balanced) <= tol
        assert _rel(g @ g_inv_t.mT, torch.eye(r, dtype=F64).expand(3, r, r)) <= tol


def test_the_kernels_flag_what_lies_beyond_their_bound():
    """A Gram of condition 100× the bound, a singular one and a non-finite one are flagged by
    every kernel; a well-conditioned head beside them is not."""
    r, bound = 8, iterative.supported_condition(F64, 8)
    p = torch.cat([_spd(1, r, 1e2), _spd(1, r, 100 * bound), _spd(1, r, 1e2), _spd(1, r, 1e2)])
    p[2, :, 0] = p[2, 0, :] = 0.0  # singular
    p[3, 0, 0] = float("nan")
    q = _spd(4, r, 1e2, seed=3)
    expected = [True, False, False, False]
    assert iterative.roots(p, bound)[2].tolist() == expected
    assert iterative.SylvesterSolver(p, q, bound).ok.tolist() == expected
    assert iterative.balancing(p, q, bound)[2].tolist() == expected


def test_the_kernels_commute_with_orthogonal_conjugation():
    """f(KᵀPK) = Kᵀf(P)K to round-off: what the optimisers' equivariance needs of them."""
    r, bound = 8, iterative.supported_condition(F64, 8)
    p, q = _spd(2, r, 1e3), _spd(2, r, 1e3, seed=1)
    c = torch.randn(2, r, r, generator=_gen(4), dtype=F64)
    k, _ = torch.linalg.qr(torch.randn(2, r, r, generator=_gen(5), dtype=F64))
    turn = lambda x: k.mT @ x @ k  # noqa: E731
    solve = lambda p, q, c: iterative.SylvesterSolver(p, q, bound).solve(c)  # noqa: E731
    assert _rel(iterative.roots(turn(p), bound)[0], turn(iterative.roots(p, bound)[0])) <= 1e-12
    assert _rel(solve(turn(p), turn(q), turn(c)), turn(solve(p, q, c))) <= 1e-12
    g = iterative.balancing(p, q, bound)[0]
    assert _rel(iterative.balancing(turn(p), turn(q), bound)[0], turn(g)) <= 1e-12


# ---- the frames -----------------------------------------------------------------------------


def _routes(metric, kind=M.HeadOV):
    exact = kind(4, 48, 8, metric)
    return exact, exact.with_geometry("iterative")


@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_iterative_frames_agree_with_the_exact_ones(metric, condition):
    """float64, factors of condition 1 to 1e4: horizontal projection, Riemannian gradient,
    second moments and the optimiser's re-dressing (invariants kept, point balanced) of the
    iterative route within 1e-7 of the exact route's (measured at most 2e-9), no head
    falling back."""
    exact, it = _routes(metric)
    point = exact.random_point(generator=_gen(1), dtype=F64, condition=condition)
    v = tuple(torch.randn(t.shape, generator=_gen(2), dtype=F64) for t in point)
    fe, fi = exact.at(point), it.at(point)
    assert not bool(fi.data.fallback.any())
    for ours, theirs in [
        (fi.horizontal(v), fe.horizontal(v)),
        (fi.riemannian_gradient(v), fe.riemannian_gradient(v)),
        (fi.mean_square(v), fe.mean_square(v)),
    ]:
        assert max(_rel(a, b) for a, b in zip(ours, theirs)) <= 1e-7
    moved, covector, (carried,) = it.redress(point, v, (v,))
    assert _rel(it.invariants(moved)[0], exact.invariants(point)[0]) <= 1e-12
    assert float(it.balance_gap(moved).max()) <= 1e-7
    # the dressed point differs from the exact one by an orthogonal K per head (O(r))
    reference = exact.redress(point, v, ())[0]
    a, a_ref = exact.factors(moved)[0], exact.factors(reference)[0]
    k = torch.linalg.lstsq(a_ref, a).solution
    assert _rel(k.mT @ k, torch.eye(8, dtype=F64).expand_as(k)) <= 1e-7


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_heads_beyond_the_bound_fall_back_to_the_exact_route_and_are_flagged(metric):
    """Heads of condition 1e5 (Grams 1e10) beside well-conditioned ones: the first are
    flagged ``fallback`` and get the exact route's values (to the round-off of the memory
    layouts the products see, 1e-10 at Gram condition 1e10); the second keep the iterations'."""
    exact, it = _routes(metric)
    good = exact.random_point(generator=_gen(1), dtype=F64, condition=10.0)
    bad = exact.random_point(generator=_gen(2), dtype=F64, condition=1e5)
    point = tuple(torch.cat([g[:2], b[2:]]) for g, b in zip(good, bad))
    v = tuple(torch.randn(t.shape, generator=_gen(3), dtype=F64) for t in point)
    fi = it.at(point)
    assert fi.data.fallback.tolist() == [False, False, True, True]
    ours, theirs = fi.horizontal(v), exact.at(point).horizontal(v)
    assert max(_rel(a[2:], b[2:]) for a, b in zip(ours, theirs)) <= 1e-10
    assert max(_rel(a[:2], b[:2]) for a, b in zip(ours, theirs)) <= 1e-7


def test_the_route_is_an_option_of_the_bundle_checked_when_built():
    with pytest.raises(ValueError, match=r"geometry must be one of \('exact', 'iterative'\)"):
        M.HeadQK(2, 8, 4, geometry="newton")
    with pytest.raises(ValueError, match="damping=0.001 needs geometry='exact'"):
        M.HeadQK(2, 8, 4, metric="invariant", damping=1e-3, geometry="iterative")
    with pytest.raises(ValueError, match="geometry must be 'exact' or 'iterative'"):
        use_geometry([], "fast")
    with pytest.raises(NotImplementedError, match="does not provide with_geometry"):
        M.RotaryQK(2, 8, 4).with_geometry("iterative")
    bundle = M.HeadOV(2, 8, 4).with_geometry("iterative")
    assert "geometry='iterative'" in repr(bundle) and bundle.stacked(4).geometry == "iterative"
    assert bundle.stack_key() != M.HeadOV(2, 8, 4).stack_key()  # routes never share a batch


# ---- equivariance on the iterative route ----------------------------------------------------


def _iterative(groups):
    return use_geometry(groups, "iterative")


EQUIVARIANT = {
    "adam euclidean": lambda m: QuotientAdam(_iterative(quotopt.symmetries(m)), lr=1e-3),
    "adam invariant": lambda m: QuotientAdam(
        quotopt.symmetries(m, metric="invariant", geometry="iterative"), lr=1e-3
    ),
    "muon": lambda m: QuotientMuon(
        _iterative(quotopt.symmetries(m)), lr=3e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    ),
}


@pytest.mark.parametrize("name", list(EQUIVARIANT))
def test_runs_from_p_and_p_g_give_one_function_on_the_iterative_route(name):
    """Condition 100, 150 steps, float64: the same function to 1e-6 relative."""
    assert _orbit_gap(EQUIVARIANT[name], F64) <= 1e-6


def test_the_controls_are_not_equivariant():
    """AdamW, and Euclidean QuotientAdam on the iterative route without dressing: gaps of
    order one (measured 0.1 to 1)."""
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)  # noqa: E731
    undressed = lambda m: QuotientAdam(  # noqa: E731
        _iterative(quotopt.symmetries(m)), lr=1e-3, dress_every=None
    )
    assert _orbit_gap(adamw, F64) > 1e-3
    assert _orbit_gap(undressed, F64) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EQUIVARIANT))
def test_in_float32_the_iterative_gap_is_the_round_off_of_the_gauge(name):
    """Float32: the gap from p·g within 10× the gap from p·g·g⁻¹ (the gauge's round-off,
    amplified by training), as on the exact route."""
    gap = _orbit_gap(EQUIVARIANT[name], torch.float32)
    control = _orbit_gap(EQUIVARIANT[name], torch.float32, round_trip=True)
    assert gap <= 10 * control
