"""pymanopt's second-order trust-region solver on a head quotient, via the adapter.

``manifolds.adapters.pymanopt.PymanoptManifold`` exposes the quotient of any bundle to pymanopt:
horizontal projections as tangent spaces, the bundle's metric, p + v as retraction and the exact
Riemannian Hessian (with the connection terms of the GL(r)-invariant metric). Here the bundle is
``HeadQK(n_heads, d, r)`` and the cost is low-rank matrix completion per head,
½ Σ_h ‖P_Ω(A_h B_hᵀ − M*_h)‖², which depends on the point only through the invariants A_h B_hᵀ:
a function on the quotient. ``TrustRegions`` runs from the same random start on the quotient
under both metrics and, for reference, on the total space (pymanopt's own ``Euclidean``
manifolds, where the Hessian at a solution has r² zero eigenvalues per head; on the quotient it
has none). One seed of one small problem: the iteration counts illustrate, they do not rank.

Needs the ``interop`` extra (``pip install 'quotopt[interop]'``). Run
``python examples/pymanopt_head_quotient.py``.
"""

from __future__ import annotations

import numpy as np
import pymanopt
import torch
from pymanopt.manifolds import Euclidean, Product

import manifolds
from manifolds.adapters.pymanopt import PymanoptManifold


def run(d: int = 10, r: int = 2, n_heads: int = 2, observed: float = 0.7, seed: int = 0) -> dict:
    """Complete ``n_heads`` rank-``r`` d×d matrices from a fraction ``observed`` of entries."""
    rng = np.random.default_rng(seed)
    left, right = rng.standard_normal((n_heads, d, r)), rng.standard_normal((n_heads, r, d))
    target = torch.from_numpy(left @ right)
    mask = torch.from_numpy((rng.random((n_heads, d, d)) < observed).astype(np.float64))
    quotient = {
        m: PymanoptManifold(manifolds.HeadQK(n_heads, d, r, m), seed=seed)
        for m in ("euclidean", "invariant")
    }
    start = quotient["euclidean"].random_point()  # the same start for every run
    spaces = {
        "quotient, euclidean metric": quotient["euclidean"],
        "quotient, invariant metric": quotient["invariant"],
        "total space (no quotient)": Product([Euclidean(n_heads, d, r)] * 2),
    }
    print(f"matrix completion: {n_heads} heads of rank {r} in {d}x{d}, {observed:.0%} observed")
    print(f"  {'space':<28} {'iterations':>10} {'cost':>9} {'‖grad‖':>8} {'rel. error':>10}")
    results = {}
    for label, manifold in spaces.items():
        # --8<-- [start:solve]
        @pymanopt.function.pytorch(manifold)
        def cost(a, b):
            return 0.5 * ((mask * (a @ b.mT - target)) ** 2).sum()

        problem = pymanopt.Problem(manifold, cost)
        solver = pymanopt.optimizers.TrustRegions(verbosity=0, max_iterations=100)
        x0 = start if isinstance(manifold, PymanoptManifold) else list(start)
        result = solver.run(problem, initial_point=x0)
        # --8<-- [end:solve]
        a, b = (torch.from_numpy(np.asarray(t)) for t in result.point)
        error = float(torch.linalg.norm(a @ b.mT - target) / torch.linalg.norm(target))
        results[label] = dict(
            iterations=result.iterations,
            cost=float(result.cost),
            grad_norm=float(result.gradient_norm),
            relative_error=error,
        )
        print(
            f"  {label:<28} {result.iterations:>10} {result.cost:>9.1e} "
            f"{result.gradient_norm:>8.1e} {error:>10.1e}"
        )
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    run()
