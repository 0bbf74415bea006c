"""Re-dressing carries r×r statistics (``Frame.redressed(..., statistics=...)``).

A matrix-statistic optimiser (SOAP-like, LoRA-RITE's r×r moment) keeps per head statistics such
as S = GᵢᵀGᵢ of a factor of the gradient, VᵢᵀVᵢ of a factor of a moment, or the inverse of the
former (a preconditioner). Re-dressing moves the point by u, the gradient by u⁻ᵀ and the moments
by u; each statistic must then equal the one recomputed from the carried vectors, which holds
exactly when it is carried by the congruence its kind declares (``Bundle.act_statistic``,
``docs/theory/dressing.md``). Checked in float64 to 1e-12 (relative) on the GL(r) head pairs
(both metrics, the damped invariant metric of LoRA adapters, exact and iterative routes), the
rotary commutant, positive rescalings of degree 1 and 2, and a product; the control carries the
covector statistics by the tangent congruence and misses by more than 1e-3.
"""

from __future__ import annotations

import pytest
import torch

import manifolds as M
from manifolds.testing import relative_error

F64 = torch.float64
TOL = 1e-12


def _factor(bundle, vector, index):
    """Factor ``index`` of ``vector`` as (…, rows, r): a product's tensors are numbered through
    its components."""
    if isinstance(bundle, M.ProductBundle):
        for part_bundle, part in zip(bundle.components, bundle.components_of(vector)):
            if index < part_bundle.n_tensors:
                return part_bundle.factors(part)[index]
            index -= part_bundle.n_tensors
    return bundle.factors(vector)[index]


def _gram(x):
    return x.mT @ x


BUNDLES = {
    "HeadQK euclidean": lambda: M.HeadQK(3, 7, 3),
    "HeadOV invariant": lambda: M.HeadOV(3, 7, 3, "invariant"),
    "HeadQK damped (LoRA)": lambda: M.HeadQK(2, 6, 3, "invariant", damping=0.1),
    "HeadOV iterative": lambda: M.HeadOV(2, 8, 4, geometry="iterative"),
    "RotaryQK": lambda: M.RotaryQK(2, 6, 4),
    "PositiveRescaling": lambda: M.PositiveRescaling(4, 5, 3),
    "PositiveRescaling degree 2": lambda: M.PositiveRescaling(4, 5, 3, "invariant", degree=2),
    "product": lambda: M.ProductBundle([M.HeadOV(2, 5, 2), M.PositiveRescaling(3, 4, 4)]),
}


def _indices(bundle):
    return range(bundle.n_tensors)


def _setup(name, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bundle = BUNDLES[name]()
    point = bundle.random_point(generator=gen, dtype=F64)
    g = bundle.random_group_element(generator=gen, dtype=F64)
    point = bundle.act(point, g)  # off the dressed section
    grad = bundle.random_tangent(point, generator=gen)
    tangents = tuple(bundle.random_tangent(point, generator=gen) for _ in range(2))
    return bundle, point, grad, tangents


def _statistics(bundle, grad, tangents, covector_kind="covector"):
    """Per tensor: GᵢᵀGᵢ, Σ VᵢᵀVᵢ over the tangents, and (GᵢᵀGᵢ)⁻¹, with their kinds."""
    out = []
    for i in _indices(bundle):
        g = _factor(bundle, grad, i)
        out.append((i, covector_kind, _gram(g)))
        out.append((i, "tangent", sum(_gram(_factor(bundle, t, i)) for t in tangents)))
        out.append((i, "tangent", torch.linalg.inv(_gram(g))))
    return out


@pytest.mark.parametrize("name", list(BUNDLES))
def test_carried_statistics_equal_those_of_the_carried_vectors(name):
    bundle, point, grad, tangents = _setup(name)
    stats = _statistics(bundle, grad, tangents)
    frame, carried_grad, carried, carried_stats = bundle.at(point).redressed(grad, tangents, stats)
    assert relative_error(frame.point, bundle.dress(point)) <= 1e-7 or name == "HeadOV iterative"
    expected = _statistics(bundle, carried_grad, carried)
    assert len(carried_stats) == len(expected)
    for (i, kind, _), got, (_, _, want) in zip(stats, carried_stats, expected):
        assert relative_error(got, want) <= TOL, (i, kind)


@pytest.mark.parametrize("name", list(BUNDLES))
def test_the_wrong_congruence_misses(name):
    """The control: covector statistics carried as if they were tangent ones."""
    bundle, point, grad, tangents = _setup(name)
    wrong = _statistics(bundle, grad, tangents, covector_kind="tangent")
    _, carried_grad, carried, carried_stats = bundle.at(point).redressed(grad, tangents, wrong)
    expected = _statistics(bundle, carried_grad, carried)
    errors = [relative_error(got, want) for got, (_, _, want) in zip(carried_stats, expected)]
    covector_errors = errors[0::3]
    assert min(covector_errors) > 1e-3


def test_redress_without_statistics_keeps_its_three_entries():
    """The optimisers' call: no statistics, three entries, the same point and vectors."""
    bundle, point, grad, tangents = _setup("HeadQK euclidean")
    plain = bundle.at(point).redressed(grad, tangents)
    with_stats = bundle.at(point).redressed(grad, tangents, ())
    assert len(plain) == 3 and len(with_stats) == 4 and with_stats[3] == ()
    assert torch.equal(plain[0].point[0], with_stats[0].point[0])
    assert torch.equal(plain[1][1], with_stats[1][1])


def test_act_statistic_is_the_congruence_of_the_action():
    """``act_statistic`` agrees with the statistic of the acted-on vectors for a random g of
    condition 10 (float64, 1e-12); bad arguments are refused naming the rule."""
    bundle, point, grad, tangents = _setup("HeadOV invariant", seed=3)
    g = bundle.random_group_element(generator=torch.Generator().manual_seed(4), dtype=F64)
    moved_grad, moved_tangent = bundle.act_dual(grad, g), bundle.act(tangents[0], g)
    for i in range(2):
        got = bundle.act_statistic(_gram(bundle.factors(grad)[i]), g, i, "covector")
        assert relative_error(got, _gram(bundle.factors(moved_grad)[i])) <= TOL
        got = bundle.act_statistic(_gram(bundle.factors(tangents[0])[i]), g, i, "tangent")
        assert relative_error(got, _gram(bundle.factors(moved_tangent)[i])) <= TOL
    with pytest.raises(ValueError, match="kind in"):
        bundle.act_statistic(torch.eye(3, dtype=F64), g, 0, "moment")
    with pytest.raises(ValueError, match="index 0 or 1"):
        bundle.act_statistic(torch.eye(3, dtype=F64), g, 2, "tangent")
    with pytest.raises(NotImplementedError, match="act_statistic"):
        M.ResidualRotation(4, (1,)).act_statistic(torch.eye(4), torch.eye(4), 0, "tangent")
