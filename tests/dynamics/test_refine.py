"""Critical points, then counts: flat directions at a refined critical point
(docs/theory/flat-directions.md).

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
)
from quotopt.groups import group_point, joint_groups, symmetries, write_point
from quotopt.lab.experiments.teacher import balance_teacher, teacher_targets
from quotopt.models import Transformer

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


# ---- the relational transformer ---------------------------------------------------------------
# The model declares all its modelled symmetries in one joint group: O(k) on the channel axis of
# every tensor, GL(r) per head on the same tensors, O(D) on the embedding's gauge axis
# (``quotopt.models._relational_groups``). ``channels=False`` is the control: gauge + heads.


def _relational_problem(weight_decay=1e-2, seed=0):
    from quotopt.models import RelationalTransformer

    torch.manual_seed(seed)
    model = RelationalTransformer(
        5, n_channels=3, d_gauge=3, n_layers=1, n_heads=1, max_len=4, d_head=2,
        d_mlp_channels=3, lean_mlp=False,
    ).double()  # fmt: skip
    declared = [g for g in symmetries(model) if "bundle" in g]  # the joint group
    control = [g for g in model.symmetry_groups(channels=False) if "bundle" in g]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    # the balanced point of the declared group, the gated MLP's rescalings and the stream scale
    balance_teacher(model, declared)
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
    start = tuple(p + 1e-5 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in teacher)
    return model, objective, start, declared, control


def test_relational_declares_the_channel_rotations_jointly():
    """One joint group, so(3) gauge + 2·gl(2) heads + so(3) channels = 14 (compact 8), exact
    to 1e-12 in float64; the control (channels=False) declares 3 + 8 = 11."""
    from quotopt.groups import verify

    model, _, _, declared, control = _relational_problem()
    (joint,) = declared
    assert (joint["bundle"].group_dim, joint["bundle"].compact_dim) == (14, 8)
    assert sum(g["bundle"].group_dim for g in control) == 11
    tokens = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(5))
    assert verify(model, declared, tokens)["joint"] <= 1e-12


def test_relational_counts_gauge_heads_and_the_channel_rotations():
    """λ > 0 at a refined critical point: flat_total = so(3) gauge + 2·so(2) heads + so(3)
    channel = 8, at every tolerance from 1e-7 to 1e-13. The declared reduction leaves none;
    the control without the channel part leaves the k(k−1)/2 = 3 channel rotations flat."""
    model, objective, start, declared, control = _relational_problem()
    refined = refine_critical_point(
        objective, start, lambda ps: model_orbit_basis(model, declared, ps, compact=True)
    )
    assert refined.grad_rel <= 1e-12
    for groups, expected, left in ((declared, 8, 0), (control, 5, 3)):
        basis = model_orbit_basis(model, groups, refined.params, compact=True)
        counts = critical_point_counts(objective, refined.params, basis)
        assert (counts["expected_flat"], counts["flat_total"], counts["flat_horizontal"]) == (
            expected, 8, left,
        )  # fmt: skip
        for tol in ("1e-07", "1e-10", "1e-13"):
            assert counts["flat_by_tolerance"][tol] == [8, left]


def test_relational_interpolating_minimum_leaves_only_the_mlp_rescalings():
    """λ = 0 at F = 0: the whole declared orbit (14) is flat, and so are four exact
    non-compact symmetries that no bundle declares (``quotopt.models._relational_groups``):
    the m = 3 gated-MLP rescalings (w_in·s, w_gate/s, w_out/s) and the stream scale
    (tok_emb, wo, w_out)·c with logit_scale/c. flat_total = 18, flat_horizontal = 4, at every
    tolerance from 1e-9 to 1e-12 and at the widest gap; the stream scale, whose curvature only
    the norm's ε gives, drops out below 1e-12·max|λ| (at the balanced point)."""
    model, objective, start, declared, _ = _relational_problem(0.0)
    level = lambda ps: model_orbit_basis(model, declared, ps)  # noqa: E731
    refined = refine_critical_point(objective, start, level)
    counts = critical_point_counts(objective, refined.params, level(refined.params), rel_tol=1e-10)
    assert (counts["expected_flat"], counts["flat_total"], counts["flat_horizontal"]) == (14, 18, 4)
    for tol in ("1e-09", "1e-11", "1e-12"):
        assert counts["flat_by_tolerance"][tol] == [18, 4]
    assert (counts["by_gap"]["flat_total"], counts["by_gap"]["flat_horizontal"]) == (18, 4)


@torch.no_grad()
def _imbalances(model) -> list[float]:
    """½ d‖θ‖²/d log s along each undeclared generator: per hidden channel ‖w_in[:, c]‖² −
    ‖w_gate[:, c]‖² − ‖w_out[c]‖², and Σ‖(tok_emb, wo, w_out)‖² − α² for the stream scale."""
    mlp, attn = model.blocks[0].mlp, model.blocks[0].attn
    rescale = mlp.w_in.square().sum(0) - mlp.w_gate.square().sum(0) - mlp.w_out.square().sum(1)
    scaled = model.tok_emb.square().sum() + attn.wo.square().sum() + mlp.w_out.square().sum()
    return [*rescale.tolist(), float(scaled - model.logit_scale.square())]


def test_balance_teacher_reaches_the_minimal_norm_point_and_keeps_the_function(monkeypatch):
    """``balance_teacher`` (declared dressing alternated with ``balance_undeclared``) ends where
    θ is orthogonal to every undeclared generator (imbalances ≤ 1e-12·‖θ‖², from O(1) before:
    the control) and the declared dressing is a fixed point; with the norm's ε set to 0 (its
    only breaker of the stream scale) the logits are unchanged to 1e-12 (float64)."""
    from quotopt.models import RelationalTransformer

    monkeypatch.setattr("quotopt.models._common.RMS_EPS", 0.0)
    torch.manual_seed(3)
    model = RelationalTransformer(
        5, n_channels=3, d_gauge=3, n_layers=1, n_heads=1, max_len=4, d_head=2, d_mlp_channels=3,
    ).double()  # fmt: skip
    declared = [g for g in symmetries(model) if "bundle" in g]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    tokens = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(1))
    before = model(tokens)
    assert max(abs(x) for x in _imbalances(model)) >= 1e-2  # the control: unbalanced
    passes = balance_teacher(model, declared)
    norm2 = sum(float(p.detach().square().sum()) for p in model.parameters())
    assert 1 < passes < 500
    assert max(abs(x) for x in _imbalances(model)) <= 1e-12 * norm2
    assert model.balance_undeclared() <= 1e-12
    (joint,) = declared
    point = tuple(t.detach() for t in group_point(joint))
    for a, b in zip(joint["bundle"].dress(point), point):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=1e-12)


class _TeacherTask:
    """The minimal task interface of ``model_flat_directions``: the teacher regression."""

    def __init__(self, tokens, target):
        self.tokens, self.target = tokens, target

    def batch(self, split, size):
        return self.tokens, self.target

    def logits(self, call, x):
        return call(x)

    def loss(self, logits, y):
        return 0.5 * ((logits.reshape(-1) - y) ** 2).sum()


def _teacher_task_at_start(weight_decay, noise):
    """``_problem``'s model moved to its start and the regression as a task object (the
    interface ``model_flat_directions`` takes)."""
    model, _, start = _problem(weight_decay, noise)
    tokens = torch.randint(0, 5, (10, 4), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    teacher = tuple(p.detach().clone() for p in model.parameters())
    target = teacher_targets(
        lambda *ps: functional_call(model, dict(zip(names, ps)), (tokens,)), teacher, weight_decay
    )
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    return model, _TeacherTask(tokens, target)


def test_model_flat_directions_refines_and_counts_against_the_level_orbits():
    """``refine=True``: the report gains ``critical`` with ‖∇F‖ at round-off and the counts of
    the model's own reduction (the heads' GL(r): 4 compact directions, 6 O(d) ones left)."""
    from quotopt.dynamics import model_flat_directions

    model, task = _teacher_task_at_start(1e-2, 1e-4)
    report = model_flat_directions(task, model, 1e-8, 1e-2, refine=True)
    critical = report["critical"]
    assert critical["refine"]["converged"] and critical["level"] == "compact"
    assert (critical["expected_flat"], critical["flat_total"], critical["flat_horizontal"]) == (
        4, 10, 6,
    )  # fmt: skip
    assert report["compact_orbit_dim"] == 4 and report["grad_norm"] <= 1e-6


def test_balance_undeclared_leaves_a_dead_channel_alone():
    """A hidden channel with w_in[:, c] = 0 has no balanced point along its rescaling: repeated
    passes keep its scale at 1 and every parameter finite, and balance the live channels."""
    from quotopt.models import RelationalTransformer

    torch.manual_seed(4)
    model = RelationalTransformer(5, 3, 3, 1, 1, 4, d_head=2, d_mlp_channels=3).double()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.w_in[:, 0] = 0.0
    gate = mlp.w_gate[:, 0].detach().clone()
    passes = next(n for n in range(1, 500) if model.balance_undeclared() <= 1e-14)
    assert passes > 1
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    torch.testing.assert_close(mlp.w_gate[:, 0].detach(), gate, rtol=0, atol=0)
    with torch.no_grad():
        live = mlp.w_in[:, 1:].square().sum(0) - mlp.w_gate[:, 1:].square().sum(0)
        live = live - mlp.w_out[1:].square().sum(1)
    assert float(live.abs().max()) <= 1e-12
