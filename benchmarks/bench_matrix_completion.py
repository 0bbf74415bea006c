r"""Low-rank matrix completion: pymanopt's fixed-rank geometry and quotopt's quotient side by side.

Problem (fixed seed, float64). M = U Vᵀ with U, V ∈ R^{n×r} standard Gaussian; a set Ω of
⌈fraction·n²⌉ entries is observed (sampled without replacement) and a disjoint set of 5,000
held-out entries measures success. Cost f = ½ Σ_Ω ((A Bᵀ)_ij − M_ij)², evaluated only on Ω from
a sparse index list: rows of the factors are gathered per observed entry, gradients are
products with the sparse residual matrix (scipy CSR for the numpy solvers, torch CSR for ours,
sparsity built once); the dense matrix is never formed. Every solver starts from the same
point, the rank-r truncated SVD of the zero-filled, rescaled observations P_Ω(M)/fraction
(spectral initialisation, computed once, untimed), and is timed until the relative RMSE on the
held-out entries, ‖X_test − M_test‖/‖M_test‖, falls to ``--target`` (default 1e-6), checked at
every iterate; the checks are excluded from the times. torch and BLAS run on ``--threads``
threads (default 1: on a shared machine a multi-threaded BLAS spins and made (a) 15× slower).
Each solver first runs once on a tiny problem (lazy imports, first-call costs), then
``--repeats`` times (median); a run that misses the target within ``--max-time`` is not
repeated.

Solvers:

(a) ``pymanopt`` FixedRankEmbedded (the embedded manifold of rank-r matrices, X = U S Vᵀ) with
    its ConjugateGradient (Hestenes–Stiefel, Armijo back-tracking) — the reference;
(b) pymanopt's ConjugateGradient and TrustRegions on quotopt's quotient through
    ``manifolds.adapters.pymanopt.PymanoptManifold(HeadQK(1, n, r, metric))`` — X = A Bᵀ with
    A, B ∈ R^{n×r} modulo GL(r), under the Euclidean and the GL-invariant metric (exact
    Riemannian Hessian for TrustRegions);
(c) quotopt in torch: ``QuotientSGD`` (under the invariant metric this is scaled gradient
    descent, Tong, Ma & Chi 2021; lr = ``--sgd-lr``/fraction) and ``QuotientAdam`` with fixed
    learning rates, and ``riemannian_cg`` — Polak–Ribière+ on the quotient, transport by
    horizontal projection, and an *exact* line search: along X(t) = (A + t·dA)(B + t·dB)ᵀ every
    observed residual is r₀ + t r₁ + t² r₂, so f(t) is a quartic whose minimiser is a root of a
    cubic (four sums over Ω); the gathered rows and residuals are carried along the step, so an
    iteration gathers only the direction's rows.

Run: ``python benchmarks/bench_matrix_completion.py`` (500 × 500, rank 5, 5% observed) or
``--quick`` (200 × 200, rank 3, 20% observed); ``--methods a,c-rcg-invariant`` picks rows.
``main(argv)`` prints the table and returns the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import scipy.sparse as sp
import torch

import manifolds as M

QUICK = dict(n=200, rank=3, fraction=0.2)
FULL = dict(n=500, rank=5, fraction=0.05)


# ---- the problem ----------------------------------------------------------------------------
@dataclass
class Problem:
    n: int
    rank: int
    rows: np.ndarray  # observed entries (i, j) and values M_ij, |Ω| each
    cols: np.ndarray
    values: np.ndarray
    test_rows: np.ndarray  # held-out entries
    test_cols: np.ndarray
    test_values: np.ndarray
    init_a: np.ndarray  # spectral initialisation, A₀ B₀ᵀ = U₀ S₀ V₀ᵀ with A₀ = U₀S₀^½, B₀ = V₀S₀^½
    init_b: np.ndarray

    def __post_init__(self):
        order = np.lexsort((self.cols, self.rows))  # CSR order of Ω
        self._csr_order = order
        pattern = sp.csr_matrix(
            (np.ones(len(order)), (self.rows[order], self.cols[order])), shape=(self.n, self.n)
        )
        pattern.sort_indices()
        self._csr = (pattern, pattern.copy())  # two slots: the Hessian needs two at once

    def residual_matrix(self, residual: np.ndarray, slot: int = 0) -> sp.csr_matrix:
        """The sparse n×n matrix with ``residual`` on Ω (structure built once; the returned
        matrix is reused by the next call with the same ``slot``)."""
        csr = self._csr[slot]
        csr.data = residual[self._csr_order]
        return csr

    def test_error(self, a, b) -> float:
        """Relative RMSE on the held-out entries of A Bᵀ (numpy or torch factors, (n, r))."""
        a, b = (x.detach().numpy() if isinstance(x, torch.Tensor) else x for x in (a, b))
        pred = np.einsum("kr,kr->k", np.take(a, self.test_rows, 0), np.take(b, self.test_cols, 0))
        return float(np.linalg.norm(pred - self.test_values) / np.linalg.norm(self.test_values))


def make_problem(n: int, rank: int, fraction: float, seed: int = 0, n_test: int = 5000):
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal((n, rank)), rng.standard_normal((n, rank))
    n_obs = math.ceil(fraction * n * n)
    n_test = min(n_test, n * n - n_obs)
    flat = rng.choice(n * n, size=n_obs + n_test, replace=False)
    rows, cols = np.divmod(flat, n)
    values = np.einsum("kr,kr->k", u[rows], v[cols])
    zero_filled = np.zeros((n, n))
    zero_filled[rows[:n_obs], cols[:n_obs]] = values[:n_obs] / fraction
    left, s, right_t = np.linalg.svd(zero_filled)
    root = np.sqrt(s[:rank])
    return Problem(
        n, rank, rows[:n_obs], cols[:n_obs], values[:n_obs],
        rows[n_obs:], cols[n_obs:], values[n_obs:],
        left[:, :rank] * root, right_t[:rank].T * root,
    )  # fmt: skip


# ---- timing to the target ----------------------------------------------------------------------
@dataclass
class Result:
    method: str
    reached: bool
    seconds: float  # to the target (or the whole run when not reached)
    iterations: int
    error: float  # test error when stopped


class Clock:
    """Wall time since ``start`` minus the time spent in ``check`` (test-error evaluation)."""

    def __init__(self, problem: Problem, target: float, max_time: float):
        self.problem, self.target, self.max_time = problem, target, max_time
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.hit: float | None = None
        self.error = math.inf  # at the last check, or at the hit once the target is reached

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def check(self, a, b) -> bool:
        """Record the test error at (A, B); True once the target is reached."""
        if self.hit is not None:
            return True
        t = time.perf_counter()
        self.error = self.problem.test_error(a, b)
        self.excluded += time.perf_counter() - t
        if self.error <= self.target:
            self.hit = self.elapsed()
        return self.hit is not None

    def out_of_time(self) -> bool:
        return self.elapsed() > self.max_time

    def result(self, method: str, iterations: int) -> Result:
        reached = self.hit is not None
        return Result(
            method, reached, self.hit if reached else self.elapsed(), iterations, self.error
        )


# ---- (a), (b): pymanopt -------------------------------------------------------------------------
def _stop_at_target(optimizer_cls, clock: Clock):
    """A pymanopt optimizer that also stops when ``clock`` has reached its target."""

    class StopAtTarget(optimizer_cls):
        iterations = 0

        def _check_stopping_criterion(self, *, start_time, iteration=-1, **kwargs):
            StopAtTarget.iterations = iteration
            if clock.hit is not None:
                return f"Terminated - test target reached after {iteration} iterations"
            return super()._check_stopping_criterion(
                start_time=start_time, iteration=iteration, **kwargs
            )

    return StopAtTarget


class _Residuals:
    """Residuals at the last point asked for (pymanopt asks for cost, gradient and Hessian at
    the same point), and the test-error check at each new point the gradient is asked for —
    the iterates: line searches evaluate only the cost at their trial points, and TrustRegions
    asks for gradients only at accepted points."""

    def __init__(self, problem: Problem, predict: Callable, clock: Clock, factors: Callable):
        self.problem, self.predict, self.clock, self.factors = problem, predict, clock, factors
        self._key: tuple = ()
        self._checked: tuple = ()
        self._value = None

    @staticmethod
    def _same(arrays, key) -> bool:
        return len(key) == len(arrays) and all(a is k for a, k in zip(arrays, key))

    def __call__(self, *arrays):
        if not self._same(arrays, self._key):
            self._key = arrays
            self._value = self.predict(*arrays) - self.problem.values
        return self._value

    def at_iterate(self, *arrays):
        """``__call__`` for the gradient: also checks the test error at a new iterate."""
        if not self._same(arrays, self._checked):
            self._checked = arrays
            self.clock.check(*self.factors(*arrays))
        return self(*arrays)


def run_pymanopt_fixed_rank(problem: Problem, target: float, max_time: float) -> Result:
    import pymanopt
    from pymanopt.manifolds import FixedRankEmbedded
    from pymanopt.manifolds.fixed_rank import _FixedRankPoint

    p, manifold = problem, FixedRankEmbedded(problem.n, problem.n, problem.rank)
    clock = Clock(p, target, max_time)

    def predict(u, s, vt):
        return np.einsum("kr,r,kr->k", np.take(u, p.rows, 0), s, np.take(vt.T, p.cols, 0))

    residuals = _Residuals(p, predict, clock, lambda u, s, vt: (u * s, vt.T))

    @pymanopt.function.numpy(manifold)
    def cost(u, s, vt):
        return 0.5 * float(residuals(u, s, vt) @ residuals(u, s, vt))

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(u, s, vt):
        g = p.residual_matrix(residuals.at_iterate(u, s, vt))
        gv = g @ vt.T  # (n, r)
        gtu = g.T @ u  # (n, r)
        return gv * s, np.einsum("kr,kr->r", u, gv), (gtu * s).T

    u0, s0, vt0 = np.linalg.svd(p.init_a @ p.init_b.T)
    x0 = _FixedRankPoint(u0[:, : p.rank], s0[: p.rank], vt0[: p.rank])
    problem_ = pymanopt.Problem(manifold, cost, euclidean_gradient=euclidean_gradient)
    optimizer = _stop_at_target(pymanopt.optimizers.ConjugateGradient, clock)(
        max_time=max_time, max_iterations=100_000, min_gradient_norm=0.0, verbosity=0
    )
    clock.start = time.perf_counter()
    optimizer.run(problem_, initial_point=x0)
    return clock.result("(a) pymanopt FixedRankEmbedded + CG", optimizer.iterations)


def run_pymanopt_quotient(
    problem: Problem, target: float, max_time: float, *, solver: str, metric: str
) -> Result:
    import pymanopt

    from manifolds.adapters.pymanopt import PymanoptManifold

    p = problem
    manifold = PymanoptManifold(M.HeadQK(1, p.n, p.rank, metric))
    clock = Clock(p, target, max_time)

    def predict(a, b):
        return np.einsum("kr,kr->k", np.take(a[0], p.rows, 0), np.take(b[0], p.cols, 0))

    residuals = _Residuals(p, predict, clock, lambda a, b: (a[0], b[0]))

    @pymanopt.function.numpy(manifold)
    def cost(a, b):
        res = residuals(a, b)
        return 0.5 * float(res @ res)

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(a, b):
        g = p.residual_matrix(residuals.at_iterate(a, b))
        return (g @ b[0])[None], (g.T @ a[0])[None]

    @pymanopt.function.numpy(manifold)
    def euclidean_hessian(a, b, da, db):
        g = p.residual_matrix(residuals(a, b))
        a_rows, b_cols = np.take(a[0], p.rows, 0), np.take(b[0], p.cols, 0)
        moved = np.einsum("kr,kr->k", np.take(da[0], p.rows, 0), b_cols)
        moved += np.einsum("kr,kr->k", a_rows, np.take(db[0], p.cols, 0))
        dg = p.residual_matrix(moved, slot=1)
        return (dg @ b[0] + g @ db[0])[None], (dg.T @ a[0] + g.T @ da[0])[None]

    extra = {"euclidean_hessian": euclidean_hessian} if solver == "tr" else {}
    problem_ = pymanopt.Problem(manifold, cost, euclidean_gradient=euclidean_gradient, **extra)
    optimizer_cls = {
        "cg": pymanopt.optimizers.ConjugateGradient,
        "tr": pymanopt.optimizers.TrustRegions,
    }[solver]
    optimizer = _stop_at_target(optimizer_cls, clock)(
        max_time=max_time, max_iterations=100_000, min_gradient_norm=0.0, verbosity=0
    )
    clock.start = time.perf_counter()
    with M.unchecked():
        optimizer.run(problem_, initial_point=(p.init_a[None].copy(), p.init_b[None].copy()))
    name = {"cg": "ConjugateGradient", "tr": "TrustRegions"}[solver]
    return clock.result(f"(b) pymanopt {name} on HeadQK quotient, {metric}", optimizer.iterations)


# ---- (c): quotopt in torch ----------------------------------------------------------------------
def _csr(rows: np.ndarray, cols: np.ndarray, n: int) -> torch.Tensor:
    """An n×n CSR tensor with zeros at (rows, cols), given sorted by row; values set later."""
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    with warnings.catch_warnings():  # some torch versions call sparse CSR "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow), torch.from_numpy(cols), torch.zeros(len(rows)), (n, n),
            dtype=torch.float64,
        )  # fmt: skip


class Observed:
    """The observed entries in torch, sorted by row: gathers, residuals and gradients.

    The gradient (S B, Sᵀ A) of ½‖P_Ω(A Bᵀ − M)‖² multiplies the factors by the sparse residual
    matrix S, held as two CSR tensors (S and Sᵀ) whose sparsity is built once; only their
    values change.
    """

    def __init__(self, problem: Problem):
        self.n = problem.n
        order = np.lexsort((problem.cols, problem.rows))
        rows, cols = problem.rows[order], problem.cols[order]
        self.rows, self.cols = torch.from_numpy(rows), torch.from_numpy(cols)
        self.values = torch.from_numpy(problem.values[order])
        by_col = np.lexsort((rows, cols))
        self._by_col = torch.from_numpy(by_col)
        self._s = _csr(rows, cols, self.n)
        self._s_t = _csr(cols[by_col], rows[by_col], self.n)

    def gather(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[i_k], B[j_k]) over Ω, each (|Ω|, r)."""
        return a.index_select(0, self.rows), b.index_select(0, self.cols)

    def residual(self, a_rows: torch.Tensor, b_cols: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(a_rows, b_cols) - self.values

    def gradient(self, residual, a, b) -> tuple[torch.Tensor, torch.Tensor]:
        """(∇_A, ∇_B) = (S B, Sᵀ A), S the sparse matrix of ``residual`` on Ω."""
        self._s.values().copy_(residual)
        self._s_t.values().copy_(residual.index_select(0, self._by_col))
        return self._s @ b, self._s_t @ a


def exact_step(residual, a_rows, b_cols, da_rows, db_cols):
    """argmin over t > 0 of f(t) = ½ Σ (r₀ + t r₁ + t² r₂)², the observed residuals along
    (A + t dA)(B + t dB)ᵀ: the best positive real root of the cubic f'(t). Returns (t, r₁, r₂)."""
    r1 = torch.linalg.vecdot(da_rows, b_cols) + torch.linalg.vecdot(a_rows, db_cols)
    r2 = torch.linalg.vecdot(da_rows, db_cols)
    r0 = residual
    cubic = torch.stack(
        [2 * r2.dot(r2), 3 * r1.dot(r2), r1.dot(r1) + 2 * r0.dot(r2), r0.dot(r1)]
    ).tolist()  # f'(t), highest power first
    roots = np.roots(cubic)
    real = roots[np.abs(roots.imag) <= 1e-10 * np.maximum(1.0, np.abs(roots.real))].real
    real = real[real > 0]
    if real.size == 0:
        return 0.0, r1, r2
    quartic = np.polyint(np.array(cubic))  # f(t) − f(0)
    return float(real[np.argmin(np.polyval(quartic, real))]), r1, r2


def riemannian_cg(
    problem: Problem, clock: Clock, metric: str, max_iterations: int = 100_000, refresh: int = 50
) -> int:
    """Polak–Ribière+ CG on the GL(r) quotient with exact line search (see the module docstring).

    Returns the number of iterations. The direction is transported by horizontal projection at
    the new point; PR+ needs ⟨g_new, P_H g_old⟩ = ⟨g_new, g_old⟩ (P_H is metric-orthogonal), so
    the old gradient is not transported. Along a step the residuals are updated as
    r₀ + t r₁ + t² r₂ (exact) and recomputed from the factors every ``refresh`` iterations.
    A non-descent direction restarts with the negative gradient.
    """
    obs = Observed(problem)
    bundle = M.HeadQK(1, problem.n, problem.rank, metric)
    a, b = torch.from_numpy(problem.init_a.copy()), torch.from_numpy(problem.init_b.copy())
    a_rows, b_cols = obs.gather(a, b)
    residual = obs.residual(a_rows, b_cols)

    def gradient(point):
        egrad = obs.gradient(residual, point[0][0], point[1][0])
        return bundle.horizontal_gradient(point, (egrad[0][None], egrad[1][None]))

    point = (a[None], b[None])
    grad = gradient(point)
    grad_sq = float(bundle.inner(point, grad, grad))
    direction = tuple(-g for g in grad)
    iteration = 0
    with M.unchecked():
        while iteration < max_iterations and not clock.check(a, b) and not clock.out_of_time():
            iteration += 1
            da, db = direction[0][0], direction[1][0]
            da_rows, db_cols = obs.gather(da, db)
            step, r1, r2 = exact_step(residual, a_rows, b_cols, da_rows, db_cols)
            a, b = a + step * da, b + step * db
            if iteration % refresh:
                a_rows, b_cols = a_rows + step * da_rows, b_cols + step * db_cols
                residual = residual + step * r1 + step**2 * r2
            else:
                a_rows, b_cols = obs.gather(a, b)
                residual = obs.residual(a_rows, b_cols)
            new_point = (a[None], b[None])
            new_grad = gradient(new_point)
            new_sq = float(bundle.inner(new_point, new_grad, new_grad))
            beta = max(0.0, (new_sq - float(bundle.inner(new_point, new_grad, grad))) / grad_sq)
            moved = bundle.transport(point, new_point, direction)
            direction = tuple(-g + beta * d for g, d in zip(new_grad, moved))
            if float(bundle.inner(new_point, direction, new_grad)) >= 0:
                direction = tuple(-g for g in new_grad)  # not a descent direction: restart
            point, grad, grad_sq = new_point, new_grad, new_sq
    return iteration


def run_riemannian_cg(problem: Problem, target: float, max_time: float, *, metric: str) -> Result:
    clock = Clock(problem, target, max_time)
    iterations = riemannian_cg(problem, clock, metric)
    return clock.result(f"(c) quotopt Riemannian CG, exact line search, {metric}", iterations)


def run_quotopt_optimizer(
    problem: Problem, target: float, max_time: float, *, name: str, make: Callable, metric: str
) -> Result:
    """QuotientSGD / QuotientAdam on one HeadQK group; gradients from the index lists."""
    obs = Observed(problem)
    a = torch.nn.Parameter(torch.from_numpy(problem.init_a.copy())[None])
    b = torch.nn.Parameter(torch.from_numpy(problem.init_b.copy())[None])
    bundle = M.HeadQK(1, problem.n, problem.rank, metric)
    optimizer = make([{"params": [a, b], "bundle": bundle}])
    clock = Clock(problem, target, max_time)
    iteration = 0
    while not clock.check(a[0], b[0]) and not clock.out_of_time():
        iteration += 1
        a_rows, b_cols = obs.gather(a.data[0], b.data[0])
        residual = obs.residual(a_rows, b_cols)
        grad_a, grad_b = obs.gradient(residual, a.data[0], b.data[0])
        a.grad, b.grad = grad_a[None], grad_b[None]
        optimizer.step()
    return clock.result(f"(c) quotopt {name}, {metric}", iteration)


# ---- the table -----------------------------------------------------------------------------------
def _methods(args, fraction: float) -> list[tuple[str, Callable]]:
    """(key, run) pairs; ``run(problem, target, max_time) -> Result``."""
    from quotopt import QuotientAdam, QuotientSGD

    def sgd(groups):
        return QuotientSGD(groups, lr=args.sgd_lr / fraction, dress_every=None)

    def adam(groups):
        return QuotientAdam(groups, lr=args.adam_lr, weight_decay=0.0, dress_every=None)

    quotient, optimizer = run_pymanopt_quotient, run_quotopt_optimizer
    sgd_name, adam_name = (
        f"QuotientSGD lr {args.sgd_lr:g}/fraction",
        f"QuotientAdam lr {args.adam_lr:g}",
    )
    return [
        ("a", run_pymanopt_fixed_rank),
        ("b-cg-euclidean", partial(quotient, solver="cg", metric="euclidean")),
        ("b-cg-invariant", partial(quotient, solver="cg", metric="invariant")),
        ("b-tr-invariant", partial(quotient, solver="tr", metric="invariant")),
        ("c-sgd-invariant", partial(optimizer, name=sgd_name, make=sgd, metric="invariant")),
        ("c-adam-invariant", partial(optimizer, name=adam_name, make=adam, metric="invariant")),
        ("c-rcg-euclidean", partial(run_riemannian_cg, metric="euclidean")),
        ("c-rcg-invariant", partial(run_riemannian_cg, metric="invariant")),
    ]


def _guarded(key: str, run: Callable, problem: Problem, target: float, max_time: float) -> Result:
    """``run``, with a diverging solver (quotopt's non-finite guard) reported as a row."""
    from quotopt import NonFiniteStepError

    start = time.perf_counter()
    try:
        return run(problem, target, max_time)
    except NonFiniteStepError:
        return Result(
            f"{key}: diverged (non-finite step)", False, time.perf_counter() - start, 0, math.nan
        )


def format_table(rows: Sequence[Result], reference: Result | None) -> str:
    header = (
        f"{'method':<62} {'reached':>7} {'time (s)':>9} {'iters':>7} {'test err':>9} {'vs (a)':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        speedup = ""
        if reference is not None and reference.reached and row.reached:
            speedup = f"{reference.seconds / row.seconds:.1f}x"
        lines.append(
            f"{row.method:<62} {'yes' if row.reached else 'NO':>7} {row.seconds:>9.3f} "
            f"{row.iterations:>7d} {row.error:>9.1e} {speedup:>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 x 200, rank 3, 20%% observed")
    parser.add_argument("--n", type=int, help="matrix size n (n x n)")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--fraction", type=float, help="fraction of entries observed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=1e-6, help="held-out relative RMSE")
    parser.add_argument("--max-time", type=float, default=None, help="seconds per solver run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per solver (median)")
    parser.add_argument("--methods", default="all", help="comma-separated keys (see _methods)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--sgd-lr", type=float, default=0.2, help="QuotientSGD lr x fraction")
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("n", "rank", "fraction"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    max_time = args.max_time if args.max_time is not None else (10.0 if args.quick else 30.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with _blas_threads(args.threads):
            return _run(args, sizes, max_time, repeats)
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _blas_threads(n: int):
    """numpy/scipy's BLAS on ``n`` threads too (threadpoolctl where installed): on a busy
    machine a multi-threaded BLAS spins, and pymanopt's solvers are numpy code."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(n):
        yield


def _run(args, sizes: dict, max_time: float, repeats: int) -> list[Result]:

    problem = make_problem(sizes["n"], sizes["rank"], sizes["fraction"], args.seed)
    methods = _methods(args, sizes["fraction"])
    if args.methods != "all":
        wanted = set(args.methods.split(","))
        methods = [m for m in methods if m[0] in wanted]
    start = problem.test_error(problem.init_a, problem.init_b)
    print(
        f"matrix completion: n={sizes['n']}, rank={sizes['rank']}, observed "
        f"{len(problem.rows)} ({sizes['fraction']:.0%}), held out {len(problem.test_rows)}, "
        f"target {args.target:g}, start error {start:.2e}, median of {repeats}, "
        f"torch/BLAS threads {args.threads}"
    )
    warm = make_problem(30, sizes["rank"], 0.5, args.seed, n_test=100)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the warm-up's results do not matter
        for key, run in methods:  # first calls import and initialise lazily: keep them untimed
            _guarded(key, run, warm, args.target, min(1.0, max_time))
    results = []
    for key, run in methods:
        runs = [_guarded(key, run, problem, args.target, max_time)]
        if runs[0].reached:  # a run that missed the target is not repeated
            runs += [_guarded(key, run, problem, args.target, max_time) for _ in range(repeats - 1)]
        results.append(sorted(runs, key=lambda r: r.seconds)[len(runs) // 2])
    reference = next((r for r in results if r.method.startswith("(a)")), None)
    print(format_table(results, reference))
    return results


if __name__ == "__main__":
    main()
