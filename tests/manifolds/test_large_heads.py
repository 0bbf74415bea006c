"""Heads wider than about 150 on a multi-threaded CPU.

torch's batched CPU LU (oneMKL ``getrf`` on several matrices at once) returns wrong pivots with
more than one thread for matrices larger than about 150: ``torch.linalg.solve`` and ``inv`` then
raise or return wrong values (pytorch issue 142815). The geometry solves by QR
(``manifolds.linalg.solve_left``), so the action and the inverse stay right at head dimension
192 with two threads.
"""

from __future__ import annotations

import pytest
import torch

import manifolds as M
from manifolds.linalg import inverse, solve_left


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_action_and_its_inverse_at_head_dimension_192(two_threads):
    bundle = M.HeadQK(4, 256, 192)
    point = bundle.random_point(generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    g = bundle.random_group_element(generator=torch.Generator().manual_seed(1), condition=10.0)
    moved = bundle.act(point, g)
    back = bundle.act(moved, bundle.inverse(g))
    gap = max(float((x - y).norm() / y.norm()) for x, y in zip(back, point))
    assert gap <= 1e-5
    invariant = point[0] @ point[1].mT
    assert torch.allclose(moved[0] @ moved[1].mT, invariant, rtol=1e-4, atol=1e-5)


def test_solve_left_and_inverse_agree_with_float64_references(two_threads):
    g = torch.randn(4, 192, 192, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rhs = torch.randn(4, 192, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = solve_left(g, rhs)
    assert float((g @ x - rhs).norm() / rhs.norm()) <= 1e-10
    eye = torch.eye(192, dtype=torch.float64)
    assert float((inverse(g) @ g - eye).abs().max()) <= 1e-9
