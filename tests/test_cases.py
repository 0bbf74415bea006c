"""A new bundle is one case: a toy bundle, defined here and never registered in ``CASES``,
goes through the conformance matrix, the interface checks, the optimisers' gauge
equivariance and detection (a detector registered for a module holding its point) by being one
``Case`` — the same check functions the parametrised tests run.

The toy is the scaling of a pair of vectors, (a, b) ↦ (a s, b / s) for s > 0, whose orbits are
identified by the outer product a bᵀ: the rank-one factorisation with its GL(1). Control: a
toy whose dressing breaks the field law u(p·g) = g⁻¹u(p) fails the same checks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifolds.base import Bundle
from manifolds.testing import assert_bundle
from quotopt.groups import Detector, Option, Slot
from tests.cases import CASES, Case, examples, strategy
from tests.groups import test_groups_registry
from tests.manifolds import test_interface
from tests.optim import test_optim


class PairScaling(Bundle):
    """(a, b) ↦ (a s, b / s), s > 0; the group element is a 1×1 matrix [[s]]."""

    per_head = False
    n_tensors = 2
    metric = "euclidean"

    def __init__(self, m: int, n: int):
        self.m, self.n = m, n

    def __repr__(self) -> str:
        return f"PairScaling({self.m}, {self.n})"

    group_dim = 1
    compact_dim = 0
    algebra_shape = (1, 1)
    metric_is_invariant = False

    def point_shapes(self):
        return ((self.m,), (self.n,))

    def act(self, point, g):
        a, b = point
        s = g[0, 0]
        return (a * s, b / s)

    def vertical(self, point, xi):
        a, b = point
        return (a * xi[0, 0], -b * xi[0, 0])

    def _inner(self, frame, u, v):
        return sum((x * y).sum() for x, y in zip(u, v))

    def _project_vertical(self, frame, v):
        a, b = frame.point
        c = ((a * v[0]).sum() - (b * v[1]).sum()) / (a.square().sum() + b.square().sum())
        return (c * a, -c * b)

    def dressing(self, point):
        a, b = point
        return (b.norm() / a.norm()).sqrt().reshape(1, 1)

    def balance_gap(self, point):
        p, q = (t.square().sum() for t in point)
        return (p - q).abs() / (p + q)

    def ambiguity(self, point):
        return torch.ones((), dtype=point[0].dtype)

    def invariants(self, point):
        return (torch.outer(point[0], point[1]),)

    def random_point(self, *, generator=None, dtype=None, device=None):
        dtype = dtype or torch.get_default_dtype()
        return tuple(torch.randn(k, generator=generator, dtype=dtype) for k in (self.m, self.n))

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        dtype = dtype or torch.get_default_dtype()
        side = 1.0 if torch.rand((), generator=generator) < 0.5 else -1.0
        return torch.tensor([[condition ** (side / 2)]], dtype=dtype)


class BrokenPairScaling(PairScaling):
    """The control: a 'dressing' with the wrong exponent, u(p·g) = g·u(p) instead of g⁻¹u(p)."""

    def dressing(self, point):
        return point[0].norm().reshape(1, 1)


class PairProduct(nn.Module):
    """x ↦ x (a bᵀ): a module whose parameters (a, b) are a ``PairScaling`` point."""

    def __init__(self, m: int = 4, n: int = 3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(m, generator=gen, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x @ torch.outer(self.a, self.b)


class PairProductPlusB(PairProduct):
    """The control for detection: x (a bᵀ) + Σ b is not invariant under (a s, b / s)."""

    def forward(self, x):
        return super().forward(x) + self.b.sum()


def find_pairs(path, module, request):
    """The toy's detector: ``PairScaling`` on every ``PairProduct``, probed on its own."""
    if not isinstance(module, PairProduct):
        return []
    group = {
        "params": [module.a, module.b],
        "bundle": PairScaling(*module.a.shape, *module.b.shape),
        "name": f"{path}pair",
    }
    m = module.a.shape[0]
    probe = lambda gen: ((torch.randn(2, m, generator=gen, dtype=torch.float64),), {})  # noqa: E731
    option = Option(group, "(a s, b / s)")
    return [Slot(module, path, "toy", "pair", [option], probe=probe, family="PairProduct")]


TOY = Case(
    "PairScaling",
    (lambda: PairScaling(4, 3), lambda: PairScaling(1, 5)),
    lambda: st.builds(PairScaling, st.integers(1, 5), st.integers(1, 5)),
    detect=lambda: (
        nn.Sequential(PairProduct(), nn.Linear(3, 2, dtype=torch.float64)),
        Detector("toy pairs", find_pairs),
    ),
)


def test_the_toy_is_not_registered():
    assert "PairScaling" not in {case.name for case in CASES}


@settings(max_examples=15, deadline=None, derandomize=True)
@given(bundle=strategy([TOY]), seed=st.integers(0, 2**31 - 1))
def test_conformance_of_a_new_case(bundle, seed):
    assert_bundle(bundle, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bundle", examples(cases=[TOY]))
def test_interface_of_a_new_case(bundle):
    test_interface.test_algebra_basis_spans_the_vertical_space(bundle)
    test_interface.test_group_exp_of_the_algebra_moves_along_the_orbit(bundle)


@pytest.mark.parametrize("optimiser", sorted(test_optim.OPTIMISERS))
@pytest.mark.parametrize("bundle", examples(cases=[TOY]))
def test_equivariance_of_a_new_case(bundle, optimiser):
    test_optim.check_gauge_equivariance(bundle, optimiser)


def test_detection_of_a_new_case():
    test_groups_registry.check_detection(TOY)


def test_the_checks_fail_for_a_broken_case():
    broken = BrokenPairScaling(4, 3)
    with pytest.raises(AssertionError):
        assert_bundle(broken, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(AssertionError):
        test_optim.check_gauge_equivariance(broken, "qadam")
    module = PairProductPlusB()
    wrong = dataclasses.replace(TOY, detect=lambda: (module, Detector("toy pairs", find_pairs)))
    with pytest.raises(AssertionError):
        test_groups_registry.check_detection(wrong)
