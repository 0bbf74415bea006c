"""The bundle interface: what every consumer may rely on, for every bundle (float64).

Each property has a control: a point off the section has a balance gap, a basis with a column
missing does not span, bundles of other shapes are told apart.
"""

from __future__ import annotations

import pytest
import torch

import manifolds as M
from manifolds.testing import relative_error
from quotopt import QuotientAdam
from quotopt.dynamics import vertical_basis
from tests.cases import examples

F64 = torch.float64

FACTORED = examples(factored=True)  # every case of tests/cases.py
OTHERS = examples(factored=False)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bundle", FACTORED)
def test_balance_gap_vanishes_on_the_dressed_point(bundle):
    """The norm of the bundle's own moment map, relative, is zero on dress(p) (≤ 1e-12) and
    not on a generic p (the control)."""
    p = bundle.random_point(generator=_gen(), dtype=F64)
    off_section = bundle.act(p, bundle.random_group_element(generator=_gen(1), dtype=F64))
    assert float(bundle.balance_gap(off_section).max()) > 1e-3
    assert float(bundle.balance_gap(bundle.dress(off_section)).max()) <= 1e-12


@pytest.mark.parametrize("bundle", FACTORED + OTHERS)
def test_algebra_basis_spans_the_vertical_space(bundle):
    """rank of {V(e_k)} = group_dim at a generic point; dropping one basis element loses it."""
    p = bundle.random_point(generator=_gen(), dtype=F64)
    columns = vertical_basis(bundle, p)
    assert columns.shape[-1] == bundle.group_dim
    assert int(torch.linalg.matrix_rank(columns)) == bundle.group_dim
    assert int(torch.linalg.matrix_rank(columns[:, 1:])) == bundle.group_dim - 1


@pytest.mark.parametrize("bundle", FACTORED + OTHERS)
def test_group_exp_of_the_algebra_moves_along_the_orbit(bundle):
    """d/dt act(p, exp(tξ)) at 0 is vertical(p, ξ), for the bundle's own random algebra element."""
    p = bundle.random_point(generator=_gen(), dtype=F64)
    xi = bundle.random_algebra_element(generator=_gen(2), dtype=F64)

    def scaled(x, t):
        return tuple(scaled(e, t) for e in x) if isinstance(x, tuple) else x * t

    h = 1e-6
    plus = bundle.act(p, bundle.group_exp(scaled(xi, h)))
    minus = bundle.act(p, bundle.group_exp(scaled(xi, -h)))
    fd = tuple((a - b) / (2 * h) for a, b in zip(plus, minus))
    assert relative_error(fd, bundle.vertical(p, xi)) <= 1e-7


def test_compact_dimensions():
    assert M.HeadQK(3, 6, 4).compact_dim == 3 * 6
    assert M.PositiveRescaling(5, 3, 3).compact_dim == 0
    assert M.RotaryQK(2, 6, 4).compact_dim == 2 * 2
    assert M.ResidualRotation(4, axes=(0,)).compact_dim == 6
    product = M.ProductBundle([M.HeadQK(3, 6, 4), M.ResidualRotation(4, axes=(0,))])
    assert product.compact_dim == 24


def test_metric_invariance_is_a_public_property():
    assert M.HeadQK(2, 4, 2, metric="invariant").metric_is_invariant
    assert not M.HeadQK(2, 4, 2).metric_is_invariant
    assert not M.HeadQK(2, 4, 2, metric="invariant", damping=1e-3).metric_is_invariant
    assert M.ResidualRotation(3, axes=(0,)).metric_is_invariant


def test_optional_members_raise_one_uniform_error():
    bundle = M.ResidualRotation(3, axes=(0,))
    for member, call in (
        ("factors", lambda: bundle.factors((torch.zeros(2, 3),))),
        ("with_row_reduction", lambda: bundle.with_row_reduction(None, None)),
    ):
        with pytest.raises(
            NotImplementedError, match=f"ResidualRotation does not provide {member}"
        ):
            call()


def test_row_counts_are_constructor_arguments_shown_in_repr():
    a = M.HeadOV(2, 6, 3)
    b = M.HeadOV(2, 6, 3, factor_rows=(7, 6))
    assert a.point_shapes() != b.point_shapes()
    assert repr(a) != repr(b) and "factor_rows=(7, 6)" in repr(b)


def test_load_state_dict_refuses_a_bundle_of_other_row_counts():
    """Two bundles that differ only in row counts: the state of one is refused by the other,
    and nothing is written."""
    gen = _gen()

    def optimiser(rows):
        bundle = M.HeadQK(2, 4, 2, factor_rows=(rows, 4))
        point = [t.requires_grad_() for t in bundle.random_point(generator=gen, dtype=F64)]
        for t in point:
            t.grad = torch.randn(t.shape, generator=gen, dtype=F64)
        opt = QuotientAdam([{"params": point, "bundle": bundle}], lr=1e-2)
        opt.step()
        return opt

    four, five = optimiser(4), optimiser(5)
    before = {
        k: [t.clone() for t in v]
        for k, v in five.state[five.param_groups[0]["params"][0]].items()
        if isinstance(v, tuple)
    }
    with pytest.raises(ValueError, match="saved for bundle HeadQK"):
        five.load_state_dict(four.state_dict())
    after = five.state[five.param_groups[0]["params"][0]]
    for key, tensors in before.items():
        assert all(torch.equal(x, y) for x, y in zip(tensors, after[key]))


@pytest.mark.parametrize(
    "metric, damping", [("euclidean", 0.0), ("invariant", 0.1), ("invariant", 0.0)]
)
def test_the_dressing_reuses_the_points_frame_bit_for_bit(metric, damping):
    """A float64 spectral frame holds the eigendecompositions the dressing computes itself:
    passing it changes nothing, to the bit (the undamped invariant metric's Cholesky frame has
    none, and is ignored; so is a float32 frame, since the dressing works in float64). Control:
    another point's frame gives another dressing."""
    gen = torch.Generator().manual_seed(3)
    bundle = M.HeadQK(3, 8, 4, metric=metric, damping=damping)
    single = bundle.random_point(generator=gen, dtype=torch.float32)
    u32, _ = bundle.dressing_or_identity(single)
    assert torch.equal(bundle.at(single, bundle.factorise(single)).dressing_or_identity()[0], u32)
    point = tuple(t.double() for t in single)
    u, ok = bundle.dressing_or_identity(point)
    reused, ok_reused = bundle.at(point, bundle.factorise(point)).dressing_or_identity()
    assert torch.equal(u, reused) and torch.equal(ok, ok_reused)
    other = bundle.factorise(bundle.random_point(generator=gen, dtype=torch.float64))
    if other.lam is not None:
        assert not torch.allclose(bundle.at(point, other).dressing_or_identity()[0], u)
