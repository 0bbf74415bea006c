"""The joint bundle's CG solver where O(d) has a stabiliser (manifolds.joint_linalg.solve_cg).

With fewer embedding rows than d and one r = 1 head the rotations of the rows' orthogonal
complement fix the point: the Schur operator S on so(d) is singular, and projecting a vector
that is horizontal already gives a right-hand side at round-off with components on S's null
space (docs/theory/joint.md, "The exact projection").
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manifolds as M
from manifolds import joint_linalg as jl
from manifolds.joint import JointBundle
from manifolds.testing import relative_error

D = 10
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def _bundle(n_rows: int, metric: str, solver: str) -> JointBundle:
    """An embedding of ``n_rows`` < d rows and one query/key pair with r = 1."""
    residual = M.ResidualRotation(D, [1, 1, 1], shapes=[(n_rows, D), (1, D, 1), (1, D, 1)])
    return JointBundle(residual, [(M.HeadQK(1, D, 1, metric), (1, 2))], solver=solver)


def _case(n_rows, metric, seed):
    cg, direct = _bundle(n_rows, metric, "cg"), _bundle(n_rows, metric, "direct")
    gen = torch.Generator().manual_seed(seed)
    point = cg.random_point(generator=gen, dtype=torch.float64)
    v = cg.random_tangent(point, generator=gen)
    return cg, direct, point, v, gen


def _finite(tangent) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tangent)


@SETTINGS
@given(
    n_rows=st.integers(1, 5),
    metric=st.sampled_from(["euclidean", "invariant"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cg_is_finite_and_matches_direct_on_a_stabiliser(n_rows, metric, seed):
    """float64: CG's horizontal projection of v and of a horizontal vector, and its transport,
    are finite and agree with the direct solver's to 1e-10 (relative); a horizontal vector is
    reproduced to 1e-12."""
    cg, direct, point, v, gen = _case(n_rows, metric, seed)
    h = direct.project_horizontal(point, v)
    assert relative_error(cg.project_horizontal(point, v), h) <= 1e-10
    again = cg.project_horizontal(point, h)
    assert _finite(again) and relative_error(again, h) <= 1e-12
    other = cg.random_point(generator=gen, dtype=torch.float64)
    moved = cg.transport(point, other, h)
    assert _finite(moved)
    assert relative_error(moved, direct.transport(point, other, h)) <= 1e-10


def test_stabiliser_case_is_singular_and_its_rhs_is_round_off():
    """What the property test exercises: S has a null space (the stabiliser) and projecting a
    horizontal vector solves for a right-hand side at round-off, which CG stops on at once."""
    cg, direct, point, v, _ = _case(3, "euclidean", 0)
    h = direct.project_horizontal(point, v)
    captured = {}
    solve = jl.solve_direct

    def spy(schur, rhs, basis):
        captured["S"] = torch.stack([schur(b) for b in basis]).flatten(1) @ basis.flatten(1).mT
        captured["rhs"] = rhs
        return solve(schur, rhs, basis)

    jl.solve_direct = spy
    try:
        direct.project_horizontal(point, h)
    finally:
        jl.solve_direct = solve
    evals = torch.linalg.eigvalsh(captured["S"])
    assert int((evals.abs() <= 1e-12 * evals.abs().max()).sum()) >= 3  # so(3) of the complement
    scale = direct.factorise(point).spectrum[0][-1].sqrt() * direct.norm(point, h)  # ‖V_O‖‖h‖
    assert float(captured["rhs"].norm()) <= 1e-13 * float(scale)
    cg.project_horizontal(point, h)
    assert cg.last_solve["iterations"] <= 1


def _textbook_cg(schur, precondition, rhs, tol, max_iterations):
    """PCG stopping at ‖r‖ ≤ tol·‖b‖ with unguarded divisions: the control."""
    x, res = torch.zeros_like(rhs), rhs.clone()
    norm_b = float(rhs.norm())
    z = precondition(res)
    p, rz = z, (res * z).sum()
    for _ in range(max_iterations if norm_b > 0 else 0):
        sp = schur(p)
        alpha = rz / (p * sp).sum()
        x, res = x + alpha * p, res - alpha * sp
        if float(res.norm()) <= tol * norm_b:
            break
        z = precondition(res)
        rz_new = (res * z).sum()
        p, rz = z + (rz_new / rz) * p, rz_new
    return x, {"method": "cg", "iterations": 0, "residual": 0.0, "tol": tol}


def test_control_textbook_cg_breaks_down_on_the_stabiliser(monkeypatch):
    """The same projections with a ‖b‖-relative stop and unguarded divisions: NaN for some of
    20 seeds (the property test above would fail on them)."""
    monkeypatch.setattr(
        jl, "solve_cg", lambda s, pre, rhs, tol, its, scale=0.0: _textbook_cg(s, pre, rhs, tol, its)
    )
    broken = 0
    for seed in range(20):
        cg, direct, point, v, _ = _case(3, "euclidean", seed)
        broken += not _finite(cg.project_horizontal(point, direct.project_horizontal(point, v)))
    assert broken > 0
