"""The step is unbreakable: every numerical failure is a NonFiniteStepError (or a skipped
step) that changes nothing; bad configuration is refused before anything is written; steps
are bounded and rank-deficient starts are valid. Each case failed before the robust step.
The GL(r) head pairs' matmul-only route (``geometry="iterative"``) goes through the same
cases."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

import manifolds as M
from quotopt import NonFiniteStepError, QuotientAdam, QuotientSGD, SkippedStepWarning
from quotopt.optim.base import RankDeficiencyWarning

F64 = torch.float64
BUNDLES = {
    "qk": lambda metric: M.HeadQK(2, 6, 3, metric=metric),
    "ov": lambda metric: M.HeadOV(2, 6, 3, metric=metric),
    "rotary": lambda metric: M.RotaryQK(2, 6, 4, metric=metric),
    "units": lambda metric: M.PositiveRescaling(3, 4, 5, metric=metric),
    "product": lambda metric: M.ProductBundle(
        [M.HeadQK(2, 6, 3, metric=metric), M.HeadOV(2, 6, 3, metric=metric)]
    ),
    "qk iterative": lambda metric: M.HeadQK(2, 6, 3, metric=metric, geometry="iterative"),
    "ov iterative": lambda metric: M.HeadOV(2, 6, 3, metric=metric, geometry="iterative"),
}
GEOMETRIES = ("exact", "iterative")
OPTIMISERS = {
    "qadam": lambda groups, **kw: QuotientAdam(groups, lr=1e-2, weight_decay=0.1, **kw),
    "qsgd": lambda groups, **kw: QuotientSGD(groups, lr=1e-2, momentum=0.9, **kw),
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _group(bundle, dtype=F64, seed=0):
    point = [
        t.clone().requires_grad_() for t in bundle.random_point(generator=_gen(seed), dtype=dtype)
    ]
    plain = torch.randn(4, 3, generator=_gen(seed + 1), dtype=dtype).requires_grad_()
    return [
        {"params": point, "bundle": bundle, "name": "heads"},
        {"params": [plain], "name": "rest"},
    ]


def _set_grads(groups, seed, poison=None):
    gen = _gen(seed)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if poison is not None:
        groups[0]["params"][0].grad[0, 0, 0] = poison


def _snapshot(optimiser):
    params = [p.detach().clone() for g in optimiser.param_groups for p in g["params"]]
    state = copy.deepcopy({id(k): v for k, v in optimiser.state.items()})
    clocks = [g["dress_clock"] for g in optimiser.param_groups]
    return params, state, clocks


def _assert_unchanged(optimiser, snapshot):
    params, state, clocks = snapshot
    now = [p.detach() for g in optimiser.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(params, now))
    current = {id(k): v for k, v in optimiser.state.items()}
    assert current.keys() == state.keys()
    for key, entry in state.items():
        for name, value in entry.items():
            other = current[key][name]
            pairs = zip(value, other) if isinstance(value, tuple) else [(value, other)]
            assert all(torch.equal(x, y) for x, y in pairs), name
    assert [g["dress_clock"] for g in optimiser.param_groups] == clocks


@pytest.mark.parametrize(
    "kind, metric, opt, mode, warm, poison",
    list(
        itertools.product(
            BUNDLES,
            ("euclidean", "invariant"),
            OPTIMISERS,
            ("raise", "skip"),
            (False, True),
            (float("nan"), float("inf")),
        )
    ),
)
def test_non_finite_gradients_change_nothing(kind, metric, opt, mode, warm, poison):
    groups = _group(BUNDLES[kind](metric))
    optimiser = OPTIMISERS[opt](groups, nonfinite=mode)
    if warm:
        for seed in range(3):
            _set_grads(groups, seed)
            optimiser.step()
    _set_grads(groups, 10, poison=poison)
    before = _snapshot(optimiser)
    if mode == "raise":
        with pytest.raises(NonFiniteStepError, match="heads"):
            optimiser.step()
    else:
        with pytest.warns(SkippedStepWarning, match="heads"):
            optimiser.step()
    _assert_unchanged(optimiser, before)
    _set_grads(groups, 11)  # and the optimiser goes on
    optimiser.step()
    assert all(bool(torch.isfinite(p).all()) for p in groups[0]["params"])


@pytest.mark.parametrize("defect", ["zero column", "duplicated column"])
# the invariant metric is undefined at a rank drop: such heads are regularised and flagged
@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rank_deficient_heads_step_without_a_linear_algebra_error(defect, metric, mode, geometry):
    bundle = M.HeadQK(3, 6, 3, metric=metric, geometry=geometry)
    groups = _group(bundle)
    with torch.no_grad():
        wq = groups[0]["params"][0]
        wq[1, :, 2] = 0.0 if defect == "zero column" else wq[1, :, 0]
    optimiser = QuotientAdam(groups, lr=1e-2, nonfinite=mode)
    for seed in range(3):
        _set_grads(groups, seed)
        optimiser.step()  # dressing leaves the deficient head in place; no LinAlgError
    assert all(bool(torch.isfinite(p).all()) for p in groups[0]["params"])


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_ill_conditioned_float32_heads_never_give_nan(geometry):
    """Factors with smallest singular value 1e-5 relative in float32: dress and step finite."""
    bundle = M.HeadQK(4, 16, 4, geometry=geometry)
    finite_dress = 0
    for seed in range(20):
        a, b = bundle.random_point(generator=_gen(seed), dtype=torch.float32)
        a = a.clone()
        a[:, :, -1] = a[:, :, 0] + 1e-5 * a[:, :, -1]
        point = (a, b)
        try:  # a clear rank error or a finite dressed point, never NaN
            finite_dress += all(bool(torch.isfinite(t).all()) for t in bundle.dress(point))
        except ValueError as error:
            assert "dressing needs full rank" in str(error)
            finite_dress += 1
        groups = [{"params": [t.clone().requires_grad_() for t in point], "bundle": bundle}]
        optimiser = QuotientAdam(groups, lr=0.1)
        for step in range(3):
            for p in groups[0]["params"]:
                p.grad = torch.randn(p.shape, generator=_gen(100 + step))
            optimiser.step()
        assert all(bool(torch.isfinite(p).all()) for p in groups[0]["params"])
    assert finite_dress == 20


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_a_refused_step_creates_no_state_and_keeps_the_clock(geometry):
    groups = _group(M.HeadQK(2, 6, 3, geometry=geometry))
    optimiser = QuotientAdam(groups)
    _set_grads(groups, 0, poison=float("nan"))
    with pytest.raises(NonFiniteStepError):
        optimiser.step()
    assert len(optimiser.state) == 0
    assert [g["dress_clock"] for g in optimiser.param_groups] == [0, 0]


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_lr_times_weight_decay_must_stay_below_one(cls):
    groups = _group(M.HeadQK(2, 6, 3))
    with pytest.raises(ValueError, match=r"lr·weight_decay < 1"):
        cls(groups, lr=0.5, weight_decay=2.0)
    optimiser = cls(groups, lr=0.1, weight_decay=1.0)
    optimiser.param_groups[0]["lr"] = 2.0  # a scheduler overshooting
    _set_grads(groups, 0)
    before = _snapshot(optimiser)
    with pytest.raises(ValueError, match="heads: Invalid lr·weight_decay"):
        optimiser.step()
    _assert_unchanged(optimiser, before)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"lr": float("inf")}, "Invalid learning rate"),
        ({"dress_every": 0}, "dress_every must be None or a positive integer"),
        ({"betas": (0.9, 1.5)}, "beta parameter at index 1"),
        ({"eps": -1e-8}, "Invalid epsilon"),
    ],
)
def test_per_group_hyperparameters_are_validated(override, message):
    groups = _group(M.HeadQK(2, 6, 3))
    groups[0].update(override)
    with pytest.raises(ValueError, match=message):
        QuotientAdam(groups)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6, 1e8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_invariant_metric_steps_are_bounded(cond, dtype, geometry):
    """One step at lr 1e-3 changes W_q W_kᵀ by a relative O(lr) (≤ 50·lr) at any conditioning."""
    bundle = M.HeadQK(1, 32, 8, metric="invariant", geometry=geometry)
    a, b = bundle.random_point(generator=_gen(1), dtype=dtype)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    a = (u * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 8, dtype=dtype)) @ vh
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    target = torch.randn(32, 32, generator=_gen(3), dtype=dtype)
    before = (a @ b.mT).detach()
    ((a[0] @ b[0].T - target) ** 2).sum().backward()
    optimiser = QuotientAdam([{"params": [a, b], "bundle": bundle}], lr=1e-3, dress_every=None)
    optimiser.step()
    change = float(((a @ b.mT).detach() - before).norm() / before.norm())
    assert 0 < change <= 50 * 1e-3


def test_the_step_bound_is_what_keeps_invariant_steps_small():
    """Control: the same step without the bound moves the invariant by far more than O(lr)."""
    bundle = M.HeadQK(1, 32, 8, metric="invariant")
    a, b = bundle.random_point(generator=_gen(1), dtype=F64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    a = (u * torch.logspace(0, -4, 8, dtype=F64)) @ vh
    step = bundle.riemannian_gradient((a, b), (torch.randn_like(a), torch.randn_like(b)))
    step = bundle.project_horizontal((a, b), step)
    step = tuple(1e-3 * t / max(float(t.abs().max()), 1e-300) * 32 for t in step)
    bounded = bundle.limit_step((a, b), step)
    change = lambda v: float(((a - v[0]) @ (b - v[1]).mT - a @ b.mT).norm())  # noqa: E731
    linear = float((step[0] @ b.mT + a @ step[1].mT).norm())
    assert change(bounded) <= 1.5 * linear + 1e-12
    assert M.HeadQK(1, 32, 8).limit_step((a, b), step) == step  # Euclidean: no bound


def test_lora_start_with_b_zero_is_a_valid_point():
    """ΔW = B A with B = 0: QuotientAdam (damped invariant metric and Euclidean, exact and
    iterative) and QuotientSGD step without error and move the adapter."""
    bundles = (
        M.HeadOV(1, 16, 4, metric="invariant", damping=1e-3),
        M.HeadOV(1, 16, 4),
        M.HeadOV(1, 16, 4, geometry="iterative"),
    )
    for bundle in bundles:
        for make in OPTIMISERS.values():
            a = (torch.randn(1, 16, 4, generator=_gen(0), dtype=F64) / 4).requires_grad_()
            b = torch.zeros(1, 4, 16, dtype=F64, requires_grad=True)
            target = torch.randn(16, 16, generator=_gen(1), dtype=F64)
            optimiser = make([{"params": [a, b], "bundle": bundle, "name": "lora"}])
            losses = []
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a rank-deficient start is not a lost rank
                for _ in range(20):
                    loss = ((a[0] @ b[0] - target) ** 2).sum()
                    losses.append(float(loss.detach()))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            assert float(b.detach().abs().max()) > 0
            assert losses[-1] < losses[0]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_a_head_that_loses_rank_is_reported(geometry):
    groups = _group(M.HeadQK(3, 6, 3, geometry=geometry))
    optimiser = QuotientAdam(groups, lr=1e-3)
    _set_grads(groups, 0)
    optimiser.step()
    state = optimiser.state[groups[0]["params"][0]]
    with torch.no_grad():  # head 2 of Wk collapses, with nothing left to move it back
        groups[0]["params"][1][2, :, 1] = 0.0
        for moment in state["exp_avg"]:
            moment[2] = 0.0
    _set_grads(groups, 1)
    for p in groups[0]["params"]:
        p.grad[2] = 0.0
    with pytest.warns(RankDeficiencyWarning, match=r"heads: heads \[2\]"):
        optimiser.step()
    _set_grads(groups, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not at every step
        optimiser.step()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_load_state_dict_refuses_another_optimiser_and_wrong_shapes(geometry):
    groups = _group(M.HeadQK(2, 6, 3, geometry=geometry))
    adam, sgd = QuotientAdam(groups), QuotientSGD(groups, lr=1e-2, momentum=0.9)
    _set_grads(groups, 0)
    adam.step()
    sgd.step()
    before = _snapshot(sgd)
    with pytest.raises(ValueError, match="saved by QuotientAdam, this optimiser is QuotientSGD"):
        sgd.load_state_dict(adam.state_dict())
    foreign = adam.state_dict()
    del foreign["optimizer"]  # even without the class name, the state keys tell them apart
    with pytest.raises(ValueError, match="keys"):
        sgd.load_state_dict(foreign)
    _assert_unchanged(sgd, before)
    saved = adam.state_dict()
    saved["state"][0]["exp_avg"] = tuple(t[:1] for t in saved["state"][0]["exp_avg"])
    before = _snapshot(adam)
    with pytest.raises(ValueError, match="state 'exp_avg' has shape"):
        adam.load_state_dict(saved)
    _assert_unchanged(adam, before)
    _set_grads(groups, 1)
    adam.step()  # still usable


def test_frozen_factors_are_never_changed():
    groups = _group(M.HeadQK(2, 6, 3))
    groups[0]["params"][1].requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        QuotientAdam(groups)
    for p in groups[0]["params"]:
        p.requires_grad_(False)
    optimiser = QuotientAdam(groups)
    frozen = [p.detach().clone() for p in groups[0]["params"]]
    _set_grads(groups, 0)
    optimiser.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, groups[0]["params"]))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_invariant_second_moments_are_never_negative_in_float32(geometry):
    """u = ∇ Q⁻¹ at an ill-conditioned float32 point: u (Q + δ) uᵀ computed as a product
    cancels to negative values; the frame's square-root factor gives ‖u R‖² ≥ 0 (the control
    shows the cancellation is real)."""
    bundle = M.HeadQK(4, 32, 8, metric="invariant", geometry=geometry)
    a, b = bundle.random_point(generator=_gen(0), dtype=torch.float32)
    u, _, vh = torch.linalg.svd(b, full_matrices=False)
    b = (u * torch.logspace(0, -3, 8)) @ vh
    grad = (torch.randn(a.shape, generator=_gen(1)), torch.randn(b.shape, generator=_gen(2)))
    rgrad = bundle.riemannian_gradient((a, b), grad)
    moments = bundle.slice_mean_square((a, b), rgrad)
    assert all(bool((m >= 0).all()) for m in moments)
    naive = ((rgrad[0] @ (b.mT @ b)) * rgrad[0]).mean(-1)  # the product form, in float32
    exact = ((rgrad[0].double() @ (b.mT @ b).double()) * rgrad[0].double()).mean(-1)
    assert float((naive.double() - exact).abs().max() / exact.abs().max()) > 1e-6
    # float32 at Gram condition 1e6 keeps a few digits: agreement to 5 %
    assert torch.allclose(moments[0].squeeze(-1).double(), exact, rtol=5e-2)


def test_a_parameter_written_between_steps_is_refactorised():
    """The cached frame follows the parameters: a write between steps (version counter) is
    seen, and a write through ``.data`` is seen after ``forget_factorisations()``; the steps
    then equal those of an optimiser that never cached (the control: a stale frame differs)."""

    def run(write, forget, geometry="exact"):
        groups = _group(M.HeadQK(2, 6, 3, metric="invariant", geometry=geometry))
        optimiser = QuotientAdam(groups, lr=1e-2, dress_every=None)
        _set_grads(groups, 0)
        optimiser.step()
        with torch.no_grad():
            target = groups[0]["params"][0]
            (target.data if write == "data" else target).mul_(3.0)
        if forget:
            optimiser.forget_factorisations()
        _set_grads(groups, 1)
        optimiser.step()
        return [p.detach().clone() for p in groups[0]["params"]]

    fresh = run("inplace", forget=True)
    assert all(torch.equal(a, b) for a, b in zip(run("inplace", forget=False), fresh))
    assert all(torch.equal(a, b) for a, b in zip(run("data", forget=True), fresh))
    assert not all(torch.equal(a, b) for a, b in zip(run("data", forget=False), fresh))
