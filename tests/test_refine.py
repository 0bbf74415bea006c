"""Critical points, then counts: flat directions at a refined critical point (DESIGN.md 4).

The task is a regression of a tiny Transformer's logits on a teacher's (``teacher_targets``):
with λ > 0 the targets make the balanced teacher θ₀ a critical point of
F = ½‖y − y*‖² + (λ/2)‖θ‖²; with λ = 0 θ₀ is an exact interpolating minimum. The student
starts from θ₀ + noise and ``refine_critical_point`` brings ‖∇F‖ to round-off. Tied
embeddings remove the stream-scale invariance that a gain-free final norm has otherwise
(broken only by the norm's ε, which would be a near-flat direction).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from quotopt.dynamics.refine import (
    critical_point_counts,
    model_objective,
    model_orbit_basis,
    refine_critical_point,
    teacher_targets,
)
from quotopt.joint_groups import joint_groups
from quotopt.models import Transformer
from quotopt.symmetries import group_point, symmetries, write_point

D, R = 4, 2  # d_model, d_head: so(4) = 6, per head pair so(2) = 1 (compact) or gl(2) = 4


def _problem(weight_decay, noise, seed=0):
    torch.manual_seed(seed)
    model = Transformer(5, D, 1, 2, 4, d_mlp=4, tie_embeddings=True).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        for group in joint_groups(model):  # the balanced, rotated representative
            write_point(group, group["bundle"].dress(tuple(t.detach() for t in group_point(group))))
    tokens = torch.randint(0, 5, (10, 4), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    teacher = tuple(p.detach().clone() for p in model.parameters())

    def outputs(*ps):
        return functional_call(model, dict(zip(names, ps)), (tokens,))

    target = teacher_targets(outputs, teacher, weight_decay)
    objective = model_objective(
        model, lambda forward: 0.5 * ((forward(tokens).reshape(-1) - target) ** 2).sum(),
        weight_decay,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    start = tuple(p + noise * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in teacher)
    return model, objective, start


@pytest.mark.parametrize("weight_decay", [1e-2, 0.0])
def test_refine_reaches_round_off(weight_decay):
    model, objective, start = _problem(weight_decay, 1e-4 if weight_decay else 1e-5)
    groups = joint_groups(model)
    level = lambda ps: model_orbit_basis(model, groups, ps, compact=weight_decay > 0)  # noqa: E731
    refined = refine_critical_point(objective, start, level)
    assert refined.converged and refined.grad_rel <= 1e-12
    assert refined.history[-1] <= 1e-6 * refined.history[0]


def test_refine_validates_its_arguments():
    model, objective, start = _problem(1e-2, 0.0)
    with pytest.raises(ValueError, match="rel_tol"):
        refine_critical_point(objective, start, rel_tol=0.0)


@pytest.mark.parametrize("reduction", ["joint", "heads"])
def test_counts_with_weight_decay_are_the_compact_orbit(reduction):
    """λ > 0: flat_total = dim O(d) + Σ dim O(r) = 6 + 4 exactly, at every tolerance from
    1e-7 to 1e-12. The joint quotient leaves none; the heads' quotient alone leaves the
    d(d−1)/2 = 6 rotations of the residual stream flat."""
    model, objective, start = _problem(1e-2, 1e-4)
    joint = joint_groups(model)
    level = lambda ps: model_orbit_basis(model, joint, ps, compact=True)  # noqa: E731
    refined = refine_critical_point(objective, start, level)
    assert refined.grad_rel <= 1e-12
    groups = joint if reduction == "joint" else symmetries(model, residual=False)
    counts = critical_point_counts(
        objective, refined.params, model_orbit_basis(model, groups, refined.params, compact=True)
    )
    expected, left = (10, 0) if reduction == "joint" else (4, 6)
    assert counts["expected_flat"] == expected
    assert counts["flat_total"] == 10
    assert counts["flat_horizontal"] == left
    for tol in ("1e-07", "1e-09", "1e-12"):
        assert counts["flat_by_tolerance"][tol] == [10, left]


def test_counts_at_an_interpolating_minimum_are_the_whole_orbit():
    """λ = 0 at F = 0: every orbit direction is flat, 6 + 4·4 = 22, and nothing else (H = JᵀJ
    squares J's singular values, so the tolerance is 1e-10 here)."""
    model, objective, start = _problem(0.0, 1e-5)
    groups = joint_groups(model)
    refined = refine_critical_point(
        objective, start, lambda ps: model_orbit_basis(model, groups, ps)
    )
    basis = model_orbit_basis(model, groups, refined.params)
    counts = critical_point_counts(objective, refined.params, basis, rel_tol=1e-10)
    assert counts["expected_flat"] == 22
    assert counts["flat_total"] == 22 and counts["flat_horizontal"] == 0
    for tol in ("1e-09", "1e-11"):
        assert counts["flat_by_tolerance"][tol] == [22, 0]


def test_control_counts_away_from_a_critical_point_are_not_the_orbit():
    """At the unrefined start (‖∇F‖ ≈ 1e-1) the same count misses orbit directions: the
    vertical curvature −⟨∇F, p·ξ²⟩ lifts them above the tolerance."""
    model, objective, start = _problem(0.0, 1e-3)
    groups = joint_groups(model)
    counts = critical_point_counts(objective, start, model_orbit_basis(model, groups, start))
    assert counts["flat_total"] < 22
