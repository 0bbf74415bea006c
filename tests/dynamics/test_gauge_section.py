"""``quotopt.dynamics.section_distance``: the distance to the balanced section modulo the
compact stabiliser. Zero on every point of dress(p)·K, positive off the section; the control is
``gauge_drift``, which counts the rotation K and so is of order one on the same points.

Float64, fixed seeds."""

from __future__ import annotations

import pytest
import torch

import manifolds as M
from manifolds.sampling import random_orthogonal
from quotopt.dynamics import balance_gap, gauge_drift, section_distance

F64 = torch.float64


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _stabiliser_element(bundle, generator):
    """A random element of the compact stabiliser of the section: O(r) per head for GL(r)
    heads (a reflection included, det = −1), the identity for positive rescaling."""
    if bundle.compact_dim == 0:
        return torch.ones(bundle.n_heads, 1, 1, dtype=F64)
    k = random_orthogonal((bundle.n_heads,), bundle.d_head, generator, F64)
    k[0, :, 0] = -k[0, :, 0]  # head 0: the other component of O(r)
    return k


BUNDLES = [
    pytest.param(lambda: M.HeadQK(3, 5, 2), id="HeadQK-r2"),
    pytest.param(lambda: M.HeadOV(2, 6, 4), id="HeadOV-r4"),
    pytest.param(lambda: M.PositiveRescaling(4, 3, 2), id="PositiveRescaling"),
]


@pytest.mark.parametrize("make", BUNDLES)
def test_section_distance_is_zero_on_the_stabiliser_orbit_of_a_dressed_point(gen, make):
    bundle = make()
    dressed = bundle.dress(bundle.random_point(generator=gen, dtype=F64))
    for _ in range(3):
        rotated = bundle.act(dressed, _stabiliser_element(bundle, gen))
        distance = section_distance(bundle, rotated)
        assert distance.shape == (bundle.n_heads,)
        assert float(distance.max()) <= 1e-12
        assert float(balance_gap(bundle, rotated).max()) <= 1e-12  # the same zero set


@pytest.mark.parametrize("make", BUNDLES[:2])
def test_gauge_drift_counts_the_rotation_section_distance_ignores(gen, make):
    """The control: on the same rotated balanced points the drift to the dressing is of order
    one, so the zero above is not a property of any distance to dress(p)."""
    bundle = make()
    dressed = bundle.dress(bundle.random_point(generator=gen, dtype=F64))
    rotated = bundle.act(dressed, _stabiliser_element(bundle, gen))
    assert float(gauge_drift(bundle, rotated).min()) > 1e-1
    assert float(section_distance(bundle, rotated).max()) <= 1e-12


@pytest.mark.parametrize("make", BUNDLES)
def test_section_distance_is_positive_off_the_section(gen, make):
    bundle = make()
    dressed = bundle.dress(bundle.random_point(generator=gen, dtype=F64))
    for condition in (1.5, 10.0, 100.0):
        g = bundle.random_group_element(generator=gen, dtype=F64, condition=condition)
        moved = bundle.act(dressed, g)
        assert float(section_distance(bundle, moved).min()) > 1e-3
        assert float(balance_gap(bundle, moved).min()) > 1e-3


def test_section_distance_is_the_nearest_balanced_point(gen):
    """Procrustes gives the minimum over O(r): no sampled rotation of the dressed point comes
    closer, and the distance is invariant under the stabiliser acting on p itself."""
    bundle = M.HeadQK(2, 4, 3)
    point = bundle.random_point(generator=gen, dtype=F64)
    dressed, norm = bundle.dress(point), torch.cat([t.flatten(1) for t in point], 1).norm(dim=1)
    best = section_distance(bundle, point)
    for _ in range(200):
        k = random_orthogonal((2,), 3, gen, F64)
        diff = [p - q for p, q in zip(point, bundle.act(dressed, k))]
        sampled = torch.cat([t.flatten(1) for t in diff], 1).norm(dim=1) / norm
        assert bool((sampled >= best - 1e-12).all())
    k = random_orthogonal((2,), 3, gen, F64)
    assert torch.allclose(section_distance(bundle, bundle.act(point, k)), best, atol=1e-12)


def test_section_distance_refuses_a_stabiliser_it_does_not_know(gen):
    bundle = M.RotaryQK(2, 8, 4)
    point = bundle.random_point(generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="use balance_gap"):
        section_distance(bundle, point)
    float(balance_gap(bundle, point).max())  # the alternative exists for it
    rotation = M.ResidualRotation(3, (1,), shapes=((5, 3),))
    with pytest.raises(ValueError, match="head bundles"):
        section_distance(rotation, rotation.random_point(generator=gen, dtype=F64))
