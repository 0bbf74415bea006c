"""Head bundles off the tested path: rank-deficient and dead starts under the invariant metric,
and the trajectory of QuotientAdam at ill-conditioned heads (docs/theory/optimisers.md)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import manifolds as M
import quotopt.optim.adam as functional
from manifolds.frames import frame_from_grams
from manifolds.testing import relative_error
from quotopt import QuotientAdam, QuotientMuon, QuotientSGD
from quotopt.optim.base import RankDeficiencyWarning

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- LoRA's start: one factor zero --------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_one_zero_factor_steps_under_the_undamped_invariant_metric(dtype):
    """W_v = 0 (LoRA's B = 0) with the defaults: the zero Gram gets the pseudo-inverse (zero),
    not a damping of `tiny` whose inverse overflows; the head moves and the loss falls, with no
    warning (a rank-deficient start is not a lost rank)."""
    bundle = M.HeadOV(n_heads=1, d_model=10, d_head=2, metric="invariant")
    wv = torch.zeros(1, 10, 2, dtype=dtype, requires_grad=True)
    wo = torch.randn(1, 2, 10, generator=_gen(0), dtype=dtype).requires_grad_()
    target = torch.randn(10, 10, generator=_gen(1), dtype=dtype)
    optimiser = QuotientAdam([{"params": [wv, wo], "bundle": bundle, "name": "lora"}], lr=1e-2)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            loss = ((wv[0] @ wo[0] - target) ** 2).sum()
            losses.append(float(loss.detach()))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    assert float(wv.detach().abs().max()) > 0
    assert losses[-1] < 0.9 * losses[0]


def test_a_zero_gram_has_a_zero_pseudo_inverse_in_the_cholesky_frame():
    """The undamped frame of a zero factor: inverse and square root zero (finite once cast to
    float32), flagged; a rank-one Gram is damped by tr(G)/r instead."""
    p = torch.zeros(2, 3, 3, dtype=F64)
    p[1] = torch.diag(torch.tensor([2.0, 0.0, 0.0], dtype=F64))
    q = torch.eye(3, dtype=F64).expand(2, 3, 3)
    frame = frame_from_grams(p, q, 0.0, spectral=False)
    assert torch.equal(frame.inv_p[0], torch.zeros(3, 3, dtype=F64))
    assert bool(torch.isfinite(frame.inv_p.float()).all())
    assert frame.deficient.tolist() == [True, True]
    assert frame.damp_p.flatten().tolist() == [0.0, 2.0 / 3]
    eye = torch.eye(3, dtype=F64)
    assert relative_error(frame.inv_p[1] @ (p[1] + 2.0 / 3 * eye), eye) < 1e-14


# ---- a head with every factor zero -----------------------------------------------------------


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD, QuotientMuon])
def test_a_dead_head_is_reported_at_construction(cls):
    """Both factors zero: a critical point of every loss, never left — warned, naming group and
    head; a head with one zero factor (head 2) is a valid start and is not named."""
    bundle = M.HeadOV(3, 10, 2, metric="invariant")
    wv = torch.randn(3, 10, 2, generator=_gen(0), dtype=F64)
    wo = torch.randn(3, 2, 10, generator=_gen(1), dtype=F64)
    wv[1], wo[1], wv[2] = 0.0, 0.0, 0.0
    group = {"params": [wv.requires_grad_(), wo.requires_grad_()], "bundle": bundle, "name": "ov"}
    with pytest.warns(RankDeficiencyWarning, match=r"ov: heads \[1\] of HeadOV.*every factor zero"):
        optimiser = cls([group], lr=1e-2)
    before = (wv[1].detach().clone(), wo[1].detach().clone())
    target = torch.randn(10, 10, generator=_gen(2), dtype=F64)
    ((wv @ wo - target) ** 2).sum().backward()
    optimiser.step()
    assert torch.equal(wv[1].detach(), before[0]) and torch.equal(wo[1].detach(), before[1])
    assert float(wv[2].detach().abs().max()) > 0  # one zero factor: it moves


def test_a_dead_head_of_a_product_is_reported():
    """A product (fused q/k/v: a QK and an OV pair) numbers its heads like
    ``rank_deficient_heads``: the OV pair's head 0 follows the QK pair's two heads."""
    qk, ov = M.HeadQK(2, 10, 2), M.HeadOV(2, 10, 2)
    bundle = M.ProductBundle([qk, ov])
    point = [t.requires_grad_() for t in (*qk.random_point(), *ov.random_point())]
    with torch.no_grad():
        point[2][0], point[3][0] = 0.0, 0.0
    with pytest.warns(RankDeficiencyWarning, match=r"heads \[2\] of ProductBundle"):
        QuotientAdam([{"params": point, "bundle": bundle, "name": "qkv"}], lr=1e-2)


def test_one_zero_factor_is_not_a_dead_head():
    """The control: LoRA's start (B = 0, A random) draws no warning."""
    bundle = M.HeadOV(2, 10, 2, metric="invariant")
    wv = torch.zeros(2, 10, 2, dtype=F64, requires_grad=True)
    wo = torch.randn(2, 2, 10, generator=_gen(0), dtype=F64).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuotientAdam([{"params": [wv, wo], "bundle": bundle}], lr=1e-2)
    assert bundle.dead_heads((wv, wo)).tolist() == [False, False]


# ---- the trajectory at ill-conditioned heads ---------------------------------------------------

SHAPE = (1, 32, 8)  # one head, d = 32, r = 8
LR, STEPS = 1e-2, 50


def _ill_conditioned(metric: str, cond: float, seed: int):
    """A head whose W_q has singular values log-spaced over [1/cond, 1], and ⟨C, W_q W_kᵀ⟩."""
    bundle = M.HeadQK(*SHAPE, metric=metric)
    a, b = bundle.random_point(generator=_gen(seed), dtype=F64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    a = (u * torch.logspace(0, -math.log10(cond), SHAPE[2], dtype=F64)) @ vh
    c = torch.randn(SHAPE[1], SHAPE[1], generator=_gen(seed + 100), dtype=F64)
    return bundle, (a, b), c


def _run(metric: str, cond: float, seed: int, g=None):
    """(‖M_T − M_0‖/‖M_0‖, the largest ‖M_{t+1} − M_t‖, M_T) after STEPS steps of
    QuotientAdam (lr 1e-2, no decay, no dressing) from the point, or from point·g."""
    bundle, point, c = _ill_conditioned(metric, cond, seed)
    if g is not None:
        point = bundle.act(point, g)
    a, b = (t.clone().requires_grad_() for t in point)
    group = {"params": [a, b], "bundle": bundle}
    optimiser = QuotientAdam([group], lr=LR, weight_decay=0.0, dress_every=None)
    start = previous = (a @ b.mT).detach()
    largest = 0.0
    for _ in range(STEPS):
        optimiser.zero_grad()
        (c * (a[0] @ b[0].T)).sum().backward()
        optimiser.step()
        now = (a @ b.mT).detach()
        largest, previous = max(largest, float((now - previous).norm())), now
    return float((previous - start).norm() / start.norm()), largest, previous


def _step_bound() -> float:
    """1.5·√2·c·lr·√(r·(rows_a + rows_b)): every row of Adam's direction has metric RMS ≤ c,
    the horizontal projection is metric-orthogonal, ‖V₁Bᵀ + AV₂ᵀ‖ ≤ √2‖V‖_metric, and the
    step bound keeps the second-order change ≤ ½ the first-order one."""
    _, d, r = SHAPE
    return 1.5 * math.sqrt(2) * functional.RATIO_BOUND * LR * math.sqrt(r * 2 * d)


@pytest.mark.parametrize("cond", [1e4, 1e6])
@pytest.mark.parametrize("seed", [0, 1])
def test_invariant_metric_trajectory_is_bounded(cond, seed):
    """Every step changes W_q W_kᵀ by at most the stated bound, so 50 steps move it no further
    than 50 bounds, and no further than the Euclidean metric moves it (36–44 relative here)."""
    change, largest, _ = _run("invariant", cond, seed)
    euclidean, _, _ = _run("euclidean", cond, seed)
    assert largest <= _step_bound() * (1 + 1e-9)
    assert change <= euclidean


def test_without_the_ratio_bound_the_trajectory_runs_away(monkeypatch):
    """The control: with Adam's first moment free to outgrow √v as the metric drifts, the
    normalised direction grows ×1.7 a step and M moves 30× further than under the Euclidean
    metric (1.2e3–1.4e3 relative at condition 1e6)."""
    monkeypatch.setattr(functional, "RATIO_BOUND", math.inf)
    change, largest, _ = _run("invariant", 1e6, 0)
    euclidean, _, _ = _run("euclidean", 1e6, 0)
    assert change > 10 * euclidean and largest > 10 * 1.5 * math.sqrt(2) * 2 * LR * 23


def test_the_bounded_trajectory_stays_gauge_equivariant():
    """The ratio bound binds at condition 1e4 and is computed from gauge-invariant second
    moments: runs from p and p·g (condition 10) end on the same orbit."""
    bundle = M.HeadQK(*SHAPE, metric="invariant")
    g = bundle.random_group_element(generator=_gen(7), dtype=F64)
    _, _, reference = _run("invariant", 1e4, 0)
    _, _, moved = _run("invariant", 1e4, 0, g=g)
    assert relative_error(moved, reference) <= 1e-8
