"""The geoopt and pymanopt adapters (``manifolds.adapters``): members, solvers, equivariance.

Skipped cleanly when the ``interop`` extra (geoopt, pymanopt) is absent. Everything runs in
float64 on tiny problems. Torch runs single-threaded here: on a loaded 2-core machine a 2-thread
OpenMP region (e.g. ``cholesky_ex`` on a 2x2 matrix) can wait ~10 ms for a time slice.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import manifolds as M
from manifolds.testing import relative_error

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def geoopt():
    return pytest.importorskip("geoopt")


@pytest.fixture
def pymanopt():
    return pytest.importorskip("pymanopt")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _product() -> M.ProductBundle:
    """Two head bundles (both layouts, both metrics) and a residual rotation of an embedding."""
    return M.ProductBundle(
        [
            M.HeadQK(2, 5, 2, metric="invariant"),
            M.HeadOV(1, 5, 3, metric="euclidean"),
            M.ResidualRotation(5, (1,), shapes=((3, 5),)),
        ]
    )


def _loss(point, targets):
    """½ Σ ‖invariant - target‖², invariant under the bundle's group."""
    return sum(0.5 * ((x - y) ** 2).sum() for x, y in zip(point, targets))


def test_package_imports_nothing_heavy():
    code = (
        "import sys, manifolds.adapters as a; "
        "assert 'geoopt' not in sys.modules and 'pymanopt' not in sys.modules, sys.modules.keys(); "
        "assert sorted(a.__all__) == ['GeooptManifold', 'PymanoptManifold']"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=root)


# ---- geoopt ---------------------------------------------------------------------------------
def test_geoopt_pack_unpack_and_checks(geoopt):
    import manifolds.adapters as adapters
    from manifolds.adapters.geoopt import GeooptManifold

    assert adapters.GeooptManifold is GeooptManifold  # the lazy attribute
    bundle = _product()
    man = GeooptManifold(bundle)
    point = bundle.random_point(generator=_gen(0), dtype=F64)
    flat = man.pack(point)
    assert flat.shape == (sum(t.numel() for t in point),) and man.ndim == 1
    views = man.unpack(flat)
    assert relative_error(views, point) == 0
    base, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(base <= v.data_ptr() < end for v in views)  # views, not copies
    param = geoopt.ManifoldParameter(flat, manifold=man)
    assert man.check_point_on_manifold(param)
    with pytest.raises(ValueError, match="flat tensor"):
        geoopt.ManifoldParameter(flat[:-1], manifold=man)
    deficient = list(point)
    deficient[0] = deficient[0].clone()
    deficient[0][0, :, 1] = deficient[0][0, :, 0]  # head 0 of Wq loses rank
    ok, reason = man.check_point_on_manifold(man.pack(deficient), explain=True)
    assert not ok and "rank" in reason
    assert man.random().shape == flat.shape and torch.equal(man.origin(), man.origin())
    assert "HeadQK" in repr(man)


def test_geoopt_members_delegate_to_the_bundle(geoopt):
    from manifolds.adapters.geoopt import GeooptManifold

    bundle = _product()
    man = GeooptManifold(bundle)
    gen = _gen(1)
    p = bundle.random_point(generator=gen, dtype=F64)
    u, v = bundle.random_tangent(p, generator=gen), bundle.random_tangent(p, generator=gen)
    x, fu, fv = man.pack(p), man.pack(u), man.pack(v)

    assert torch.allclose(man.egrad2rgrad(x, fu), man.pack(bundle.horizontal_gradient(p, u)))
    hu = man.proju(x, fu)
    assert torch.allclose(hu, man.pack(bundle.project_horizontal(p, u)))
    assert man.check_vector_on_tangent(x, hu, atol=1e-10, rtol=1e-10)
    assert not man.check_vector_on_tangent(x, fu, atol=1e-10, rtol=1e-10)
    assert torch.allclose(man.inner(x, fu, fv), bundle.inner(p, u, v))
    assert man.inner(x, fu, keepdim=True).shape == (1,)
    assert torch.allclose(man.norm(x, fu) ** 2, man.inner(x, fu))
    assert torch.equal(man.projx(x), x)
    y = man.retr(x, 0.1 * hu)
    assert torch.equal(y, man.expmap(x, 0.1 * hu)) and torch.allclose(y, x + 0.1 * hu)
    moved = man.transp(x, y, fv)
    assert torch.allclose(moved, man.pack(bundle.transport(p, man.unpack(y), v)))
    y2, moved2 = man.retr_transp(x, 0.1 * hu, fv)
    assert torch.equal(y2, y) and torch.equal(moved2, moved)
    assert torch.equal(man.transp_follow_retr(x, 0.1 * hu, fv), moved)

    # component_inner: packed per-slice slice_mean_square, polarised for two vectors
    second = man.component_inner(x, fu)
    assert second.shape == x.shape and bool((second >= 0).all())
    assert torch.allclose(man.component_inner(x, fu, fu), second)
    assert torch.allclose(man.component_inner(x, fu, fv), man.component_inner(x, fv, fu))


def test_geoopt_component_inner_is_gauge_invariant(geoopt):
    from manifolds.adapters.geoopt import GeooptManifold

    bundle = M.ProductBundle(
        [M.HeadQK(2, 5, 2, metric="invariant"), M.ResidualRotation(5, (1,), shapes=((3, 5),))]
    )
    man = GeooptManifold(bundle)
    gen = _gen(2)
    p = bundle.random_point(generator=gen, dtype=F64)
    g = bundle.random_group_element(generator=gen, dtype=F64)
    u = bundle.random_tangent(p, generator=gen)
    moved = man.component_inner(man.pack(bundle.act(p, g)), man.pack(bundle.act(u, g)))
    assert relative_error(moved, man.component_inner(man.pack(p), man.pack(u))) < 1e-10


def _geoopt_run(geoopt, bundle, point, targets, optimiser, steps, manifold=None, zero_seed=False):
    """Run a geoopt optimiser on ½‖invariants - targets‖²; return (final point, losses)."""
    from manifolds.adapters.geoopt import GeooptManifold

    man = GeooptManifold(bundle)
    param = geoopt.ManifoldParameter(man.pack(point), manifold=manifold or man)
    opt = optimiser([param])
    if zero_seed:  # seed the momentum the torch way: the first step is lr·grad
        opt.state[param]["momentum_buffer"] = torch.zeros_like(param)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(bundle.invariants(man.unpack(param)), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return man.unpack(param.detach()), losses


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_geoopt_optimisers_train_on_quotients(geoopt, name):
    bundle = M.ProductBundle(
        [M.HeadQK(2, 6, 2, metric="invariant"), M.ResidualRotation(6, (1,), shapes=((4, 6),))]
    )
    gen = _gen(3)
    p = bundle.random_point(generator=gen, dtype=F64)
    targets = bundle.invariants(bundle.random_point(generator=gen, dtype=F64))
    optimiser = {
        "adam": lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.05),
        "sgd": lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.02, momentum=0.5),
    }[name]
    _, losses = _geoopt_run(geoopt, bundle, p, targets, optimiser, steps=300)
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])


# Measured (HeadQK(2, 6, 2), invariant metric, lr 0.05, 50 steps, float64, g of condition 10):
# relative difference of the invariants W_q W_kᵀ of the runs from p and from p·g. The test
# asserts the regime: < 1e-8 (equivariant to round-off) or > 1e-2 (not equivariant).
EQUIVARIANCE = {
    # name: (optimiser kwargs, geoopt.Euclidean instead of the quotient, zero-seeded, measured)
    "sgd": (dict(lr=0.05), False, False, 2.5e-15),
    "sgd-momentum": (dict(lr=0.05, momentum=0.9), False, False, 0.54),
    "sgd-nesterov": (dict(lr=0.05, momentum=0.9, nesterov=True), False, False, 0.084),
    "sgd-momentum-zero-seeded": (dict(lr=0.05, momentum=0.9), False, True, 4.1e-14),
    "sgd-weight-decay": (dict(lr=0.05, weight_decay=0.1), False, False, 9.0),
    "adam": (dict(lr=0.05), False, False, 1.3e-14),
    "adam-weight-decay": (dict(lr=0.05, weight_decay=0.1), False, False, 0.56),
    "adam-euclidean-manifold": (dict(lr=0.05), True, False, 0.53),
}


@pytest.mark.parametrize("case", sorted(EQUIVARIANCE))
def test_geoopt_equivariance_measured(geoopt, case):
    """Momentum-free RiemannianSGD and RiemannianAdam (with our component_inner) commute with
    the gauge action to round-off; geoopt's momentum seeding (raw Euclidean gradient) and
    per-coordinate Adam (geoopt.Euclidean) do not."""
    kwargs, euclidean, zero_seed, measured = EQUIVARIANCE[case]
    bundle = M.HeadQK(2, 6, 2, metric="invariant")
    gen = _gen(1)
    p = bundle.random_point(generator=gen, dtype=F64)
    g = bundle.random_group_element(generator=gen, dtype=F64)
    targets = bundle.invariants(bundle.random_point(generator=gen, dtype=F64))
    cls = geoopt.optim.RiemannianAdam if case.startswith("adam") else geoopt.optim.RiemannianSGD
    runs = [
        _geoopt_run(
            geoopt,
            bundle,
            start,
            targets,
            lambda ps: cls(ps, **kwargs),
            steps=50,
            manifold=geoopt.Euclidean(ndim=1) if euclidean else None,
            zero_seed=zero_seed,
        )[0]
        for start in (p, bundle.act(p, g))
    ]
    error = relative_error(bundle.invariants(runs[1]), bundle.invariants(runs[0]))
    if measured < 1e-8:
        assert error < 1e-8, error
    else:
        assert error > 1e-2, error


# ---- pymanopt -------------------------------------------------------------------------------
def test_tangent_vector_arithmetic(pymanopt):
    from manifolds.adapters.pymanopt import TangentVector

    u = TangentVector([np.ones(2), np.arange(3.0)])
    v = TangentVector([np.full(2, 2.0), np.ones(3)])
    for result, expected in [
        (u + v, [[3, 3], [1, 2, 3]]),
        (u - v, [[-1, -1], [-1, 0, 1]]),
        (np.float64(2.0) * u, [[2, 2], [0, 2, 4]]),
        (u * 2, [[2, 2], [0, 2, 4]]),
        (u / 2, [[0.5, 0.5], [0, 0.5, 1]]),
        (-u, [[-1, -1], [0, -1, -2]]),
    ]:
        assert isinstance(result, TangentVector) and len(result) == 2
        for a, b in zip(result, expected):
            np.testing.assert_allclose(a, b)
    w = u
    w += v  # arithmetic, not list.extend
    assert len(w) == 2 and len(u) == 2
    with pytest.raises(ValueError, match="tangent vector"):
        u + TangentVector([np.ones(2)])


def _completion(pymanopt, metric, *, d=8, r=2, observed=0.8, seed=0):
    """Matrix completion ½‖P_Ω(A Bᵀ - M*)‖² on HeadQK(1, d, r), rank-r noiseless M*."""
    from manifolds.adapters.pymanopt import PymanoptManifold

    man = PymanoptManifold(M.HeadQK(1, d, r, metric=metric), seed=seed)
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.standard_normal((d, r)) @ rng.standard_normal((r, d)))
    mask = torch.from_numpy((rng.random((d, d)) < observed).astype(np.float64))

    @pymanopt.function.pytorch(man)
    def cost(a, b):
        return 0.5 * ((mask * (a[0] @ b[0].mT - target)) ** 2).sum()

    return man, pymanopt.Problem(man, cost)


# measured iterations to ‖grad‖ < 1e-6 (seed 0): euclidean / invariant metric
SOLVERS = {"SteepestDescent": (220, 166), "ConjugateGradient": (76, 50), "TrustRegions": (15, 13)}


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_pymanopt_solvers_complete_a_matrix(pymanopt, solver, metric):
    man, problem = _completion(pymanopt, metric)
    x0 = man.random_point()
    optimiser = getattr(pymanopt.optimizers, solver)(verbosity=0, max_iterations=400)
    result = optimiser.run(problem, initial_point=x0)
    budget = 2 * SOLVERS[solver][metric == "invariant"]
    assert result.stopping_criterion.startswith("Terminated - min grad norm reached")
    assert result.iterations <= budget and result.cost < 1e-10 * problem.cost(x0)


def _slope(ts, errors) -> float:
    return float(np.polyfit(np.log10(ts), np.log10(errors), 1)[0])


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_pymanopt_taylor_first_order(pymanopt, metric):
    """f(R(x, t·v)) - f(x) - t·g(grad f, v) = O(t²) over t ∈ [1e-5, 1e-2]."""
    man, problem = _completion(pymanopt, metric, seed=3)
    x = man.random_point()
    v = man.random_tangent_vector(x)
    f0, slope0 = problem.cost(x), man.inner_product(x, problem.riemannian_gradient(x), v)
    ts = np.logspace(-5, -2, 13)
    errors = [abs(problem.cost(man.retraction(x, t * v)) - f0 - t * slope0) for t in ts]
    assert 1.9 <= _slope(ts, errors) <= 2.1


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_pymanopt_taylor_second_order(pymanopt, metric):
    """f(x + tv) = f + t·g(w, v) + t²/2·[g(Hess v, v) + g(w, Γ(v, v))] + O(t³).

    x + tv is a second-order retraction only for the Euclidean metric (Γ = 0); for the invariant
    metric its covariant acceleration Γ(v, v) enters (without it the slope is 2). The window is
    t ∈ [1e-4, 1e-1]: at t = 1e-5 the t³ error reaches round-off.
    """
    man, problem = _completion(pymanopt, metric, seed=3)
    x = man.random_point()
    v = man.random_tangent_vector(x)
    grad = problem.riemannian_gradient(x)
    hess_v = problem.riemannian_hessian(x, v)
    first = man.inner_product(x, grad, v)
    second = man.inner_product(x, hess_v, v) + man.inner_product(x, grad, man.christoffel(x, v, v))
    ts = np.logspace(-4, -1, 13)
    f0 = problem.cost(x)
    errors = [
        abs(problem.cost(man.retraction(x, t * v)) - f0 - t * first - t * t / 2 * second)
        for t in ts
    ]
    assert 2.9 <= _slope(ts, errors) <= 3.1
    # the Hessian is a symmetric operator on the horizontal space
    w = man.random_tangent_vector(x)
    asymmetry = man.inner_product(x, hess_v, w) - man.inner_product(
        x, v, problem.riemannian_hessian(x, w)
    )
    assert abs(asymmetry) < 1e-10 * man.norm(x, hess_v)
    assert man.norm(x, hess_v - man.projection(x, hess_v)) < 1e-10 * man.norm(x, hess_v)


@pytest.mark.parametrize(
    "bundle", [M.HeadQK(2, 5, 2, "invariant"), M.HeadOV(1, 4, 3, "invariant"), _product()], ids=repr
)
def test_connection_is_levi_civita(pymanopt, bundle):
    """Γ is symmetric and metric-compatible, D_ξ g(η, ζ) = g(Γ(ξ, η), ζ) + g(η, Γ(ξ, ζ)), which
    characterises the Levi-Civita connection; the closed forms match torch autograd."""
    from manifolds.adapters.pymanopt import christoffel, metric_derivative, metric_gradient

    gen = _gen(4)
    p = bundle.random_point(generator=gen, dtype=F64)
    xi, eta, zeta = (bundle.random_tangent(p, generator=gen) for _ in range(3))
    gamma = christoffel(bundle, p, xi, eta)
    assert relative_error(christoffel(bundle, p, eta, xi), gamma) < 1e-12
    h = 1e-5
    plus = bundle.inner(tuple(a + h * b for a, b in zip(p, xi)), eta, zeta)
    minus = bundle.inner(tuple(a - h * b for a, b in zip(p, xi)), eta, zeta)
    derivative = (plus - minus) / (2 * h)
    compatible = bundle.inner(p, gamma, zeta) + bundle.inner(
        p, eta, christoffel(bundle, p, xi, zeta)
    )
    assert abs(float(derivative - compatible)) < 1e-8 * max(abs(float(derivative)), 1.0)
    for fn in (metric_derivative, metric_gradient):
        closed = fn(bundle, p, xi, eta)
        assert relative_error(fn(bundle, p, xi, eta, autograd=True), closed) < 1e-12


def test_pymanopt_members_and_single_tensor_layout(pymanopt):
    """A one-tensor bundle uses bare arrays (point_layout 1); an O(d)-invariant loss trains."""
    from manifolds.adapters.pymanopt import PymanoptManifold

    bundle = M.ResidualRotation(4, (1,), shapes=((6, 4),))
    man = PymanoptManifold(bundle, seed=5)
    assert man.point_layout == 1 and man.dim == 6 * 4 - 6
    rng = np.random.default_rng(5)
    rows = torch.from_numpy(rng.standard_normal((6, 4)))
    target = rows @ rows.mT

    @pymanopt.function.pytorch(man)
    def cost(e):
        return 0.5 * ((e @ e.mT - target) ** 2).sum()

    problem = pymanopt.Problem(man, cost)
    x = man.random_point()
    assert isinstance(x, np.ndarray) and x.shape == (6, 4)
    v = man.random_tangent_vector(x)
    assert abs(man.norm(x, v) - 1) < 1e-12
    np.testing.assert_allclose(man.exp(x, v), man.retraction(x, v))
    np.testing.assert_allclose(man.zero_vector(x), 0)
    moved = man.transport(x, man.retraction(x, 0.1 * v), v)
    assert isinstance(moved, np.ndarray) and moved.shape == (6, 4)
    with pytest.raises(NotImplementedError):
        man.dist(x, x)
    result = pymanopt.optimizers.TrustRegions(verbosity=0).run(problem, initial_point=x)
    assert result.cost < 1e-12 * problem.cost(x)
