"""The matrix-free route to a critical point (``quotopt.dynamics.refine_krylov``).

MINRES against dense solves (definite, indefinite, singular but consistent), and inexact
Newton–MINRES against the dense Newton route on the teacher regressions of
``test_refine``: both reach ‖∇F‖ at round-off, and the points they reach compute the same
function. Float64 throughout.
"""

from __future__ import annotations

import pytest
import torch

from quotopt.dynamics.refine import model_orbit_basis, refine_critical_point
from quotopt.dynamics.refine_krylov import minres, refine_critical_point_krylov
from quotopt.groups import joint_groups
from tests.dynamics.test_refine import _problem, _teacher_task_at_start


def _symmetric(n, spectrum, seed=0):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))  # fmt: skip
    return q @ torch.diag(spectrum) @ q.mT, q


@pytest.mark.parametrize("kind", ["definite", "indefinite"])
def test_minres_reaches_the_relative_residual(kind):
    """‖b − Ax‖ ≤ rtol·‖b‖ (true residual) at condition 1e6, or 1e3 with a third of the
    spectrum negative (harder for a Krylov method: the residual polynomial must be small on
    both sides of 0); with too few iterations it is not (control)."""
    n = 60
    spectrum = torch.logspace(-6 if kind == "definite" else -3, 0, n, dtype=torch.float64)
    if kind == "indefinite":
        spectrum[::3] *= -1
    a, _ = _symmetric(n, spectrum)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = minres(lambda v: a @ v, b, 1e-10, 10 * n)
    assert float((b - a @ x).norm()) <= 1e-9 * float(b.norm())
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-4, atol=0)
    short = minres(lambda v: a @ v, b, 1e-10, 5)
    assert float((b - a @ short).norm()) > 1e-3 * float(b.norm())


def test_minres_solves_a_singular_consistent_system_in_the_range():
    """A with a 5-dimensional kernel, b in its range: x is the minimum-norm solution."""
    n = 40
    spectrum = torch.cat([torch.zeros(5, dtype=torch.float64),
                          torch.logspace(-3, 1, n - 5, dtype=torch.float64)])  # fmt: skip
    a, q = _symmetric(n, spectrum)
    b = a @ torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = minres(lambda v: a @ v, b, 1e-12, 10 * n)
    assert float((b - a @ x).norm()) <= 1e-11 * float(b.norm())
    assert float((q[:, :5].mT @ x).norm()) <= 1e-10 * float(x.norm())  # no kernel component
    assert minres(lambda v: a @ v, torch.zeros(n, dtype=torch.float64), 1e-8, 5).abs().max() == 0


@pytest.mark.parametrize("weight_decay", [1e-2, 0.0])
def test_krylov_refine_reaches_round_off_and_the_dense_routes_function(weight_decay):
    model, objective, start = _problem(weight_decay, 1e-4 if weight_decay else 1e-5)
    groups = joint_groups(model)
    level = lambda ps: model_orbit_basis(model, groups, ps, compact=weight_decay > 0)  # noqa: E731
    krylov = refine_critical_point_krylov(objective, start, level)
    dense = refine_critical_point(objective, start, level)
    assert krylov.converged and krylov.grad_rel <= 1e-12 and krylov.hessian is None
    assert krylov.history[-1] <= 1e-6 * krylov.history[0] and krylov.products > 0
    assert dense.converged and dense.products == (dense.steps + 1) * dense.hessian.shape[0]
    tokens = torch.randint(0, 5, (10, 4), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    out = [torch.func.functional_call(model, dict(zip(names, r.params)), (tokens,))
           for r in (krylov, dense)]  # fmt: skip
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-9)


def test_krylov_refine_validates_its_arguments():
    _, objective, start = _problem(1e-2, 0.0)
    for bad in (dict(rel_tol=0.0), dict(max_steps=-1), dict(max_iterations=0)):
        with pytest.raises(ValueError, match="rel_tol must be > 0"):
            refine_critical_point_krylov(objective, start, **bad)


def test_model_flat_directions_above_the_dense_limit_refines_matrix_free():
    """``dense_max`` below the model's size: the Krylov route reaches the critical point the
    dense route counts at, the vertical tangents of the compact orbits have residual
    ‖Hv‖/(max|λ|‖v‖) at round-off there, and no count is claimed."""
    from quotopt.dynamics import model_flat_directions

    model, task = _teacher_task_at_start(1e-2, 1e-4)
    report = model_flat_directions(task, model, 1e-8, 1e-2, refine=True, dense_max=10)
    critical = report["critical"]
    assert critical["route"] == "krylov" and critical["refine"]["converged"]
    assert "flat_total" not in critical and report["flat_total"] is None
    assert report["method"] == "lanczos" and report["grad_norm"] <= 1e-6
    residual = torch.tensor(report["vertical_residual"])
    assert residual.numel() == report["orbit_dim"] == 16  # gl(2) per QK and VO pair of 2 heads
    # the compact generators (so(2) per pair) are level: H annihilates them to round-off;
    # the gl(2) basis elements are not (weight decay curves them): the control
    assert report["max_level_residual"] <= 1e-12 and report["compact_orbit_dim"] == 4
    assert float(residual.min()) > 1e-7


def test_count_setting_above_the_dense_limit_reports_level_residuals_not_counts():
    """A teacher setting with ``dense_max`` below its size: refined matrix-free to round-off,
    where H annihilates the compact orbit tangents (residual ≤ 1e-10 relative to max|λ|);
    unrefined (``refine_steps=0``, the teacher plus 1e-6 noise) they are not (the control)."""
    from quotopt.lab.experiments.critical import count_setting
    from quotopt.lab.study.flat import flat_markdown

    sizes = dict(d_model=4, d_mlp=8, vocab=6, n_train=32, n_val=16)
    refined = count_setting("regression-teacher-decay", dense_max=50, **sizes)
    assert refined["n_params"] > 50 and refined["refine"]["route"] == "krylov"
    assert refined["refine"]["converged"] and refined["refine"]["grad_rel"] <= 1e-12
    for name, c in refined["counts"].items():
        assert c["flat_total"] is None and c["flat_horizontal"] is None, name
        assert c["expected_flat"] == c["compact_orbit_dim"] > 0
        assert c["max_level_residual"] <= 1e-10, (name, c["max_level_residual"])
    page = flat_markdown([refined])
    assert "refined matrix-free and not counted" in page and "flat_total None" not in page
    unrefined = count_setting("regression-teacher-decay", dense_max=50, refine_steps=0, **sizes)
    assert not unrefined["refine"]["converged"]
    assert all(c["max_level_residual"] > 1e-8 for c in unrefined["counts"].values())
