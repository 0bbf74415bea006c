"""Warm frames: the Euclidean metric's head frames built from the last exact frame's eigenbases
(``manifolds.frames.warm_frame``, ``GeneralLinearPair.reuses_bases``).

A warm projection must meet the exact one where its bases are near, err only along the orbit
where they are not (so a float32 solve stops at a residual of 1e-3, ``WARM_TOLERANCE``), fall
back to the exact solve (flagged) where it cannot meet that, be the frames a training run
actually uses, keep the optimisers equivariant (float64, warm frames forced on) and resume bit
for bit from a checkpoint (the bases are state). Tolerances: float32 warm projections from near
bases, against float64 ones: horizontal parts within 1e-6 relative, whole projections within
``WARM_TOLERANCE``; float64 equivariance 1e-6 relative after 150 steps, as on the exact route.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import manifolds as M
import quotopt
from manifolds.heads import GeneralLinearPair
from quotopt import QuotientAdam, QuotientMuon, QuotientSGD
from quotopt.groups import gauge_transform
from quotopt.models import Transformer


@pytest.fixture(autouse=True)
def _warm_at_every_rank(monkeypatch):
    """The heads here are small (r = 8, 16): warm frames forced on below ``warm_min_rank``."""
    monkeypatch.setattr(GeneralLinearPair, "warm_min_rank", 1)


def test_small_heads_are_factorised_exactly_by_default(monkeypatch):
    monkeypatch.undo()  # the default rule, not the fixture's
    assert not M.HeadQK(4, 64, 16).reuses_bases(torch.float32)
    assert M.HeadQK(2, 64, 32).reuses_bases(torch.float32)
    assert not M.HeadQK(2, 64, 32).reuses_bases(torch.float64)  # the float64 reference


def _point(condition: float, seed: int = 0, dtype=torch.float32):
    bundle = M.HeadQK(4, 48, 8)
    gen = torch.Generator().manual_seed(seed)
    point = bundle.random_point(generator=gen, dtype=torch.float64, condition=condition)
    return bundle, tuple(t.to(dtype) for t in point)


def _nudge(point, size: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(t + size * t.abs().mean() * torch.randn(t.shape, generator=gen) for t in point)


def _tangent(point, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in point)


def _relative(a, b) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


@pytest.mark.parametrize("condition", [1.0, 10.0, 100.0])
def test_a_warm_projection_meets_the_exact_one(condition):
    """Factor condition up to 100 (Grams to 1e4, what float32 resolves), bases one small step
    old, against the float64 projection: the warm projection's horizontal part within 1e-6
    relative (the exact float32 route's own error reaches 1e-5 at condition 100), the whole
    projection within ``WARM_TOLERANCE`` (its vertical error, where the solve stopped), without
    falling back."""
    bundle, p0 = _point(condition)
    p1 = _nudge(p0, 1e-3)
    warm = bundle.at(p0, bundle.factorise(p0)).moved(p1)
    assert warm.data.warm is not None  # built from the exact frame at p0
    v = _tangent(p1)
    projected = tuple(t.double() for t in warm.horizontal(v))
    p64, v64 = (tuple(t.double() for t in x) for x in (p1, v))
    reference = bundle.at(p64, bundle.factorise(p64))
    truth = reference.horizontal(v64)
    assert _relative(reference.horizontal(projected), truth) <= 1e-6
    assert _relative(projected, truth) <= M.iterative.WARM_TOLERANCE[torch.float32]
    assert warm.data.warm.exact is None  # no fallback


def test_beyond_float32_s_resolution_frames_are_exact():
    """Factor condition 1e4: float32 cannot resolve the Grams, the exact frame is formed in
    float64 (``FactoredBundle.factorise``) and the next frame is exact too, not warm."""
    bundle, p0 = _point(1e4)
    frame = bundle.at(p0, bundle.factorise(p0))
    assert frame.data.p.dtype == torch.float64
    assert frame.moved(_nudge(p0, 1e-3)).data.warm is None


def test_a_stale_basis_takes_more_rounds_head_by_head(monkeypatch):
    """Bases half a factor's size away: the first round of iterations misses the tolerance, the
    further rounds (``WARM_ROUNDS``, eight here) meet it without the exact solve, and each head
    stops on its own — its result is the one it gets solved alone."""
    monkeypatch.setattr("manifolds.iterative.WARM_ROUNDS", 8)
    bundle, p0 = _point(30.0)
    p1 = _nudge(p0, 0.5)
    warm = bundle.at(p0, bundle.factorise(p0)).moved(p1).data.warm
    rhs = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    tolerance = torch.full((4,), 1e-5)
    assert float(warm.solve(rhs)[1].max()) > 1e-5  # one round is not enough here
    xi, relative = warm.solve(rhs, tolerance)
    assert float(relative.max()) <= 1e-5
    for h in range(4):
        alone = copy.copy(warm)
        for name in ("u", "v", "p_rot", "q_rot", "inverse"):
            setattr(alone, name, getattr(warm, name)[h : h + 1])
        assert torch.equal(alone.solve(rhs[h : h + 1], tolerance[:1])[0], xi[h : h + 1])
    exact = bundle.at(p1, bundle.factorise(p1))
    v = _tangent(p1)
    projected = bundle.at(p0, bundle.factorise(p0)).moved(p1)
    horizontal = exact.horizontal(projected.horizontal(v))  # its error is vertical
    assert _relative(horizontal, exact.horizontal(v)) <= 1e-5
    assert projected.data.warm.exact is None  # no fallback


def test_a_stale_basis_falls_back_to_the_exact_solve_and_says_so(monkeypatch):
    monkeypatch.setattr("manifolds.iterative.WARM_ROUNDS", 1)  # rounds cannot rescue it
    bundle, p0 = _point(30.0)
    p1 = _nudge(p0, 0.5)  # far: the old bases no longer nearly diagonalise the Grams
    warm = bundle.at(p0, bundle.factorise(p0)).moved(p1)
    v = _tangent(p1)
    projected = warm.horizontal(v)
    assert warm.data.warm.exact is not None  # the exact frame, computed once for this frame
    exact = bundle.at(p1, bundle.factorise(p1)).horizontal(v)
    assert all(torch.equal(a, b) for a, b in zip(projected, exact))
    nearby = warm.moved(_nudge(p1, 1e-4)).data.warm
    assert nearby.age == 1 and torch.equal(nearby.u, warm.data.warm.exact.u)  # its bases


def test_the_control_a_warm_solve_without_its_fallback_is_wrong_there(monkeypatch):
    bundle, p0 = _point(30.0)
    p1 = _nudge(p0, 0.5)
    monkeypatch.setattr("manifolds.iterative.WARM_ITERATIONS", {torch.float32: 1})
    warm = bundle.at(p0, bundle.factorise(p0)).moved(p1)
    xi, relative = warm.data.warm.solve(torch.randn(4, 8, 8))
    assert float(relative.max()) > 1e-3  # one iteration from stale bases: far from solved


def test_an_inexact_solve_errs_only_along_the_orbit(monkeypatch):
    """Why the float32 tolerance (``WARM_TOLERANCE``) need not be round-off: from stale bases one
    iteration leaves the projection far from the exact one (the control), yet the difference is
    vertical — the exact horizontal projection of the warm result is the exact result to
    float32 round-off (1e-5 relative, the factor condition 30)."""
    monkeypatch.setitem(M.iterative.WARM_TOLERANCE, torch.float32, float("inf"))  # no fallback
    monkeypatch.setattr("manifolds.iterative.WARM_ITERATIONS", {torch.float32: 1})
    monkeypatch.setattr("manifolds.iterative.WARM_ROUNDS", 1)
    bundle, p0 = _point(30.0)
    p1 = _nudge(p0, 0.5)
    warm = bundle.at(p0, bundle.factorise(p0)).moved(p1)
    v = _tangent(p1)
    inexact = warm.horizontal(v)
    assert warm.data.warm.exact is None  # the warm solve's own result
    exact_frame = bundle.at(p1, bundle.factorise(p1))
    exact = exact_frame.horizontal(v)
    assert _relative(inexact, exact) > 1e-3  # control: far from the exact projection
    assert _relative(exact_frame.horizontal(inexact), exact) <= 1e-5  # but only vertically


def _model(dtype=torch.float32, d_model=32, n_layers=2, seed=0):
    torch.manual_seed(seed)
    return Transformer(vocab_size=11, max_len=8, d_model=d_model, n_layers=n_layers, n_heads=2).to(
        dtype
    )


def _tokens(batch=8, seed=1):
    return torch.randint(0, 11, (batch, 8), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps, seed=0):
    for i in range(steps):
        tokens = _tokens(seed=seed + i)
        opt.zero_grad()
        logits = model(tokens)[:, :-1].reshape(-1, 11)
        torch.nn.functional.cross_entropy(logits, tokens[:, 1:].flatten()).backward()
        opt.step()


OPTIMISERS = {
    "adam": lambda m: QuotientAdam(quotopt.symmetries(m), lr=3e-3),
    "sgd": lambda m: QuotientSGD(quotopt.symmetries(m), lr=3e-2, momentum=0.9),
    "muon": lambda m: QuotientMuon(quotopt.symmetries(m), lr=1e-2),
}


def _frames(opt) -> list:
    return [data for _, data in opt._frames.values()]


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_training_uses_warm_frames(name):
    model = _model()
    opt = OPTIMISERS[name](model)
    _train(model, opt, 3)
    assert any(getattr(f, "warm", None) is not None for f in _frames(opt))
    bases = [s["frame_basis"] for s in opt.state.values() if "frame_basis" in s]
    assert bases and all(b[0].abs().sum() > 0 for b in bases)  # the state holds them


def test_float64_runs_are_factorised_exactly():
    model = _model(torch.float64)
    opt = OPTIMISERS["adam"](model)
    _train(model, opt, 3)
    assert all(getattr(f, "warm", None) is None for f in _frames(opt))
    assert all("frame_basis" not in s for s in opt.state.values())


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_a_run_resumed_from_a_checkpoint_continues_bit_for_bit(name):
    """Float32 with warm frames: 7 steps (the bases 1 to 6 steps old, or refreshed), saved,
    loaded into a fresh model and optimiser with ``weights_only=True``, 6 more steps: equal to
    the run that was never interrupted, parameters and state, bit for bit."""
    model = _model()
    opt = OPTIMISERS[name](model)
    _train(model, opt, 7)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, 6, seed=7)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = OPTIMISERS[name](resumed)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 6, seed=7)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_control_without_the_bases_a_resumed_run_departs(monkeypatch):
    model = _model()
    opt = OPTIMISERS["adam"](model)
    # saved where the next step's frame is warm, one step from its bases, and that step solves
    # on it without falling back (a resumed run that lost the bases refactorises exactly there)
    saved = None
    for step in range(30):
        if [(f.warm.age, f.warm.exact) for f in _frames(opt)] != [(1, None)]:
            _train(model, opt, 1, seed=step)
            continue
        candidate = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        _train(model, opt, 1, seed=100)
        if [(f.warm.age, f.warm.exact) for f in _frames(opt)] == [(2, None)]:
            saved = candidate
            break
    assert saved is not None, "no step in 30 was solved on a warm frame"
    _train(model, opt, 5, seed=101)
    for group in saved["opt"]["param_groups"]:
        group["frame_age"] = None  # the bases forgotten: the resumed run refactorises
    resumed = _model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = OPTIMISERS["adam"](resumed)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 6, seed=100)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_a_state_saved_without_bases_loads_and_steps():
    model = _model()
    opt = OPTIMISERS["adam"](model)
    _train(model, opt, 3)
    state = opt.state_dict()
    for entry in state["state"].values():
        entry.pop("frame_basis", None)
    for group in state["param_groups"]:
        group.pop("frame_age", None)
    opt2 = OPTIMISERS["adam"](model)
    opt2.load_state_dict(state)
    _train(model, opt2, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _orbit_gap(factory, steps=150) -> float:
    models = [_model(torch.float64) for _ in range(2)]
    gauge_transform(
        models[1], quotopt.symmetries(models[1]), torch.Generator().manual_seed(2),
        condition=100.0,
    )  # fmt: skip
    for model in models:
        _train(model, factory(model), steps)
    tokens = _tokens(16, seed=99)
    with torch.no_grad():
        a, b = models[1](tokens), models[0](tokens)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_warm_frames_keep_runs_from_p_and_p_g_on_one_orbit_in_float64(monkeypatch, name):
    """Warm frames forced on in float64: condition-100 gauge, 150 steps, 1e-6 relative."""
    monkeypatch.setattr(GeneralLinearPair, "warm_dtypes", (torch.float32, torch.float64))
    calls = []
    factorise_from = GeneralLinearPair.factorise_from

    def counting(self, *args, **kwargs):
        frame = factorise_from(self, *args, **kwargs)
        calls.append(frame.warm is not None)
        return frame

    monkeypatch.setattr(GeneralLinearPair, "factorise_from", counting)
    assert _orbit_gap(OPTIMISERS[name]) <= 1e-6
    assert any(calls)  # warm frames were built


def test_the_control_adamw_leaves_the_orbit():
    assert _orbit_gap(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)) > 1e-3
