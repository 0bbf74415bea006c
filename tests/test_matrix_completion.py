"""Smoke test of benchmarks/bench_matrix_completion.py at a tiny size, and checks of its pieces."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pymanopt")

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_matrix_completion.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_matrix_completion", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_at_a_tiny_size(bench, capsys):
    argv = ["--quick", "--n", "30", "--rank", "2", "--fraction", "0.5", "--max-time", "0.5"]
    results = bench.main(argv)
    table = capsys.readouterr().out
    assert len(results) == 8 and "(a) pymanopt FixedRankEmbedded + CG" in table
    by_name = {r.method: r for r in results}
    for name in (
        "(a) pymanopt FixedRankEmbedded + CG",
        "(c) quotopt Riemannian CG, exact line search, invariant",
        "(c) quotopt Riemannian CG, exact line search, euclidean",
    ):
        assert by_name[name].reached and by_name[name].error <= 1e-6


def test_sparse_gradient_and_exact_step(bench):
    """The index-list gradient equals the dense one; the exact step minimises the quartic."""
    problem = bench.make_problem(12, 2, 0.6, seed=3, n_test=20)
    obs = bench.Observed(problem)
    gen = torch.Generator().manual_seed(0)
    a, b, da, db = (torch.randn(12, 2, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = torch.zeros(12, 12, dtype=torch.float64)
    mask[problem.rows, problem.cols] = 1.0
    target = torch.zeros(12, 12, dtype=torch.float64)
    target[problem.rows, problem.cols] = torch.from_numpy(problem.values)

    def loss(a, b):
        return 0.5 * ((mask * (a @ b.T - target)) ** 2).sum()

    leaves = (a.clone().requires_grad_(), b.clone().requires_grad_())
    dense = torch.autograd.grad(loss(*leaves), leaves)
    a_rows, b_cols = obs.gather(a, b)
    residual = obs.residual(a_rows, b_cols)
    for mine, reference in zip(obs.gradient(residual, a, b), dense):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)
    step, _, _ = bench.exact_step(residual, a_rows, b_cols, *obs.gather(da, db))
    grid = np.linspace(0.0, 3.0 * max(step, 1e-3), 3001)
    values = [float(loss(a + t * da, b + t * db)) for t in grid]
    assert float(loss(a + step * da, b + step * db)) <= min(values) + 1e-9
