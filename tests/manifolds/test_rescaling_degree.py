"""PositiveRescaling of degree k: the (a s, b s⁻ᵏ) symmetry of ReLU² (k = 2) units, in float64.

The generic properties run in the conformance matrix (``tests/manifolds/test_bundles.py``); here
what is
particular to k ≠ 1: the group law, invariance of a ReLU² MLP's function, the orbit's tangents,
the metric-orthogonal splitting, the dressed section ‖a‖² = k‖b‖², weight decay on the
invariants, the step bound, and QuotientAdam started from p and p·g on a ReLU² MLP. Each has its
control: the degree-1 action changes the ReLU² MLP's output, AdamW's runs drift apart.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manifolds as M
from manifolds.testing import relative_error
from quotopt import QuotientAdam

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


@st.composite
def degree_bundles(draw, degrees=(2, 3)):
    return M.PositiveRescaling(
        draw(st.integers(1, 4)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 5)),
        metric=draw(st.sampled_from(M.METRICS)),
        degree=draw(st.sampled_from(degrees)),
    )


def _setup(bundle, seed):
    gen = torch.Generator().manual_seed(seed)
    p = bundle.random_point(generator=gen, dtype=F64)
    return gen, p, bundle.random_group_element(generator=gen, dtype=F64)


def relu2_mlp(point, x):
    """relu([x, 1] a_j)² summed against b_j: the units of a ReLU² MLP, bias folded into a."""
    a, b = point  # (m, d_in + 1, 1), (m, d_out, 1)
    hidden = torch.relu(torch.cat([x, torch.ones_like(x[:, :1])], -1) @ a[..., 0].T)  # (N, m)
    return hidden.square() @ b[..., 0]  # (N, d_out)


# ---- the group, its orbits and the function ---------------------------------------------------
def test_degree_is_validated_and_shown():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="degree must be a positive integer"):
            M.PositiveRescaling(2, 3, 4, degree=bad)
    assert "degree=2" in repr(M.PositiveRescaling(2, 3, 4, degree=2))
    assert "degree" not in repr(M.PositiveRescaling(2, 3, 4))


@SETTINGS
@given(bundle=degree_bundles(), seed=st.integers(0, 2**31 - 1))
def test_act_is_a_group_action(bundle, seed):
    """p·1 = p, (p·g)·h = p·(gh), p·g·g⁻¹ = p; b scales by s⁻ᵏ."""
    gen, p, g = _setup(bundle, seed)
    h = bundle.random_group_element(generator=gen, dtype=F64)
    assert relative_error(bundle.act(p, torch.ones_like(g)), p) == 0.0
    assert relative_error(bundle.act(bundle.act(p, g), h), bundle.act(p, g * h)) <= 1e-14
    assert relative_error(bundle.act(bundle.act(p, g), bundle.inverse(g)), p) <= 1e-14
    b, b_moved = bundle.factors(p)[1], bundle.factors(bundle.act(p, g))[1]
    assert relative_error(b_moved, b * g**-bundle.degree) <= 1e-14


@pytest.mark.parametrize("seed", range(3))
def test_relu2_mlp_function_is_invariant_and_the_degree_one_action_is_not(seed):
    bundle = M.PositiveRescaling(6, 4 + 1, 3, degree=2)
    gen, p, g = _setup(bundle, seed)
    x = torch.randn(32, 4, generator=gen, dtype=F64)
    assert relative_error(relu2_mlp(bundle.act(p, g), x), relu2_mlp(p, x)) <= 1e-13
    degree_one = M.PositiveRescaling(6, 4 + 1, 3)
    assert relative_error(relu2_mlp(degree_one.act(p, g), x), relu2_mlp(p, x)) > 1e-3


@SETTINGS
@given(bundle=degree_bundles(), seed=st.integers(0, 2**31 - 1))
def test_vertical_vectors_are_tangent_to_orbits(bundle, seed):
    """(a ξ, −k b ξ) against the central difference of t ↦ p·exp(tξ)."""
    gen, p, _ = _setup(bundle, seed)
    xi = bundle.random_algebra_element(generator=gen, dtype=F64)
    t = 1e-5 / float(xi.norm())
    plus, minus = bundle.act(p, torch.exp(t * xi)), bundle.act(p, torch.exp(-t * xi))
    fd = tuple((u - v) / (2 * t) for u, v in zip(plus, minus))
    assert relative_error(fd, bundle.vertical(p, xi)) <= 1e-9


@SETTINGS
@given(bundle=degree_bundles(), seed=st.integers(0, 2**31 - 1))
def test_projections_are_metric_orthogonal(bundle, seed):
    """P_H z ⟂ V(η) for every η, P_V z is vertical, P_V + P_H = id; the invariant metric is
    invariant and its splitting commutes with the action."""
    gen, p, g = _setup(bundle, seed)
    z = bundle.random_tangent(p, generator=gen)
    eta = bundle.random_algebra_element(generator=gen, dtype=F64)
    horizontal, vertical = bundle.project_horizontal(p, z), bundle.project_vertical(p, z)
    scale = float(bundle.norm(p, z) * bundle.norm(p, bundle.vertical(p, eta)))
    assert abs(float(bundle.inner(p, horizontal, bundle.vertical(p, eta)))) <= 1e-12 * scale
    assert float(bundle.norm(p, bundle.project_horizontal(p, vertical))) <= 1e-12 * scale**0.5
    assert relative_error(tuple(u + v for u, v in zip(horizontal, vertical)), z) <= 1e-14
    if bundle.metric_is_invariant:
        q, gz = bundle.act(p, g), bundle.act(z, g)
        assert abs(float(bundle.inner(q, gz, gz) - bundle.inner(p, z, z))) <= 1e-12 * float(
            bundle.inner(p, z, z)
        )
        assert relative_error(bundle.project_horizontal(q, gz), bundle.act(horizontal, g)) <= 1e-12


@SETTINGS
@given(bundle=degree_bundles(), seed=st.integers(0, 2**31 - 1))
def test_dress_is_constant_on_orbits_and_balances_degree_k(bundle, seed):
    """dress(p·g) = dress(p), on it ‖a‖² = k‖b‖² (moment map and balance gap zero)."""
    _, p, g = _setup(bundle, seed)
    dressed = bundle.dress(p)
    assert relative_error(bundle.dress(bundle.act(p, g)), dressed) <= 1e-13
    a, b = bundle.factors(dressed)
    sq_a, sq_b = a.square().sum((-2, -1)), b.square().sum((-2, -1))
    assert relative_error(sq_a, bundle.degree * sq_b) <= 1e-13
    assert float(bundle.moment_map(dressed).abs().max()) <= 1e-13 * float(sq_a.max())
    assert float(bundle.balance_gap(dressed).max()) <= 1e-13


@SETTINGS
@given(bundle=degree_bundles(), seed=st.integers(0, 2**31 - 1), c=st.floats(0.1, 2.0))
def test_weight_decay_multiplies_the_invariants(bundle, seed, c):
    """scale_invariants(p, c) multiplies ‖a‖ᵏ⁻¹ a bᵀ by c, keeps the section and commutes
    with the action."""
    _, p, g = _setup(bundle, seed)
    (inv,) = bundle.invariants(p)
    assert relative_error(bundle.invariants(bundle.scale_invariants(p, c))[0], c * inv) <= 1e-13
    dressed = bundle.dress(p)
    assert float(bundle.balance_gap(bundle.scale_invariants(dressed, c)).max()) <= 1e-13
    moved = bundle.scale_invariants(bundle.act(p, g), c)
    assert relative_error(moved, bundle.act(bundle.scale_invariants(p, c), g)) <= 1e-14


@SETTINGS
@given(bundle=degree_bundles(), seed=st.integers(0, 2**31 - 1), size=st.floats(1e-3, 1e3))
def test_step_bound_commutes_with_the_action(bundle, seed, size):
    """limit_step(p·g, v·g) = limit_step(p, v)·g; small steps pass unchanged; the identity
    under the Euclidean metric."""
    gen, p, g = _setup(bundle, seed)
    v = tuple(size * t for t in bundle.random_tangent(p, generator=gen))
    bounded = bundle.limit_step(p, v)
    moved = bundle.limit_step(bundle.act(p, g), bundle.act(v, g))
    assert relative_error(moved, bundle.act(bounded, g)) <= 1e-12
    tiny = tuple(1e-6 * t / size for t in v)
    assert relative_error(bundle.limit_step(p, tiny), tiny) == 0.0
    if bundle.metric == "euclidean":
        assert relative_error(bounded, v) == 0.0


def test_step_bound_shortens_a_step_larger_than_the_unit():
    """A step 100 times the factors is shortened so that its second-order change of a^{⊗2} ⊗ b
    is half its first-order one, to the last digits."""
    bundle = M.PositiveRescaling(1, 3, 2, metric="invariant", degree=2)
    gen, p, _ = _setup(bundle, 0)
    v = tuple(100 * t for t in bundle.random_tangent(p, generator=gen))
    (a, b), (v1, v2) = (tuple(t[0, :, 0] for t in x) for x in (p, bundle.limit_step(p, v)))

    def tensor(t):  # the coefficient of tʲ in (a + t v₁)^{⊗2} ⊗ (b + t v₂), by three points
        return torch.einsum("i,j,k->ijk", a + t * v1, a + t * v1, b + t * v2)

    first = (tensor(1e-4) - tensor(-1e-4)) / 2e-4
    second = (tensor(1e-4) + tensor(-1e-4) - 2 * tensor(0.0)) / 2e-8
    assert float(second.norm()) / float(first.norm()) == pytest.approx(0.5, rel=1e-4)


# ---- QuotientAdam on a ReLU² MLP --------------------------------------------------------------
def _train_relu2(bundle, point, make_optimiser, steps=100, seed=7):
    """Fit a ReLU² MLP (point = its units) to a random target; the end point."""
    gen = torch.Generator().manual_seed(seed)
    d_in = bundle.factor_rows[0] - 1
    x = torch.randn(64, d_in, generator=gen, dtype=F64)
    target = torch.randn(64, bundle.factor_rows[1], generator=gen, dtype=F64)
    params = [torch.nn.Parameter(t.clone()) for t in point]
    optimiser = make_optimiser(params)
    for _ in range(steps):
        optimiser.zero_grad()
        ((relu2_mlp(params, x) - target) ** 2).mean().backward()
        optimiser.step()
    return tuple(p.detach() for p in params), x


def _run_gap(bundle, make_optimiser) -> float:
    """Relative gap of the functions after training from p and from p·g (condition 10)."""
    _, p, g = _setup(bundle, 11)
    end_p, x = _train_relu2(bundle, p, make_optimiser)
    end_q, _ = _train_relu2(bundle, bundle.act(p, g), make_optimiser)
    return relative_error(relu2_mlp(end_q, x), relu2_mlp(end_p, x))


@pytest.mark.parametrize(
    "metric, dress_every, weight_decay",
    [("euclidean", 100, 0.0), ("invariant", None, 0.0), ("invariant", 100, 0.1)],
)
def test_quotient_adam_is_equivariant_on_a_relu2_mlp(metric, dress_every, weight_decay):
    """From p and p·g (condition 10), 100 steps end at the same function: 1e-12 relative (≈ 1e-15
    measured), by dressing under the Euclidean metric, by the invariant metric alone without."""
    bundle = M.PositiveRescaling(6, 4 + 1, 3, metric=metric, degree=2)

    def make(params):
        group = {"params": params, "bundle": bundle}
        return QuotientAdam([group], lr=1e-2, dress_every=dress_every, weight_decay=weight_decay)

    assert _run_gap(bundle, make) <= 1e-12


@pytest.mark.parametrize("control", ["adamw", "undressed-euclidean", "degree-one-bundle"])
def test_controls_on_a_relu2_mlp_are_not_equivariant(control):
    """The same check fails (gaps ≈ 0.3–0.5 measured) for AdamW, for the Euclidean metric
    without dressing, and for QuotientAdam with the degree-1 bundle, whose dressing and
    splitting are those of another group."""
    bundle = M.PositiveRescaling(6, 4 + 1, 3, degree=2)
    geometry = M.PositiveRescaling(6, 4 + 1, 3, degree=1 if control == "degree-one-bundle" else 2)
    dress_every = None if control == "undressed-euclidean" else 100

    def make(params):
        if control == "adamw":
            return torch.optim.AdamW(params, lr=1e-2)
        group = {"params": params, "bundle": geometry}
        return QuotientAdam([group], lr=1e-2, dress_every=dress_every)

    assert _run_gap(bundle, make) > 1e-2
