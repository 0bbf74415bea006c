"""Toy problems shared by the optimiser test files."""

from __future__ import annotations

import torch

import manifolds as M


def matrix_sensing(metric: str, heads: int = 2, d: int = 6, r: int = 2, measurements: int = 40):
    """Recover rank-r matrices M*_h from random linear measurements of each (seeded):
    returns the bundle, the parameters (a random start) and the loss, a function of nothing."""
    torch.manual_seed(0)
    bundle = M.HeadQK(heads, d, r, metric=metric)
    truth = bundle.invariants(bundle.random_point(dtype=torch.float64))[0]
    sensing = torch.randn(measurements, d, d, dtype=torch.float64)

    def measure(m):
        return torch.einsum("nij,hij->hn", sensing, m)

    observed = measure(truth)
    params = [torch.nn.Parameter(t) for t in bundle.random_point(dtype=torch.float64)]

    def loss():
        return ((measure(bundle.invariants(params)[0]) - observed) ** 2).mean()

    return bundle, params, loss
