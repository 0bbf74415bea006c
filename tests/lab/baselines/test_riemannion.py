"""Riemannion (Bogachev et al., ICLR 2026): ΔW = B A is invariant under (B, A) → (B S, S⁻¹A) for
any S ∈ GL(r) (AdamW's is not: the control); the factored port equals the algorithm written out
below on dense matrices (tangent projection, transported momentum, SVD polar factor, truncated
SVD retraction); it steps from B = 0, resumes bit for bit and writes nothing on a non-finite
step."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from quotopt.groups import LoRALinear, add_lora, lora_pairs
from quotopt.lab.baselines.riemannion import Riemannion
from quotopt.lab.training.optimizers import build_adapter_optimizer
from quotopt.optim import NonFiniteStepError

F64 = torch.float64


def _model(seed=0, zero_b=False, r=3):
    torch.manual_seed(seed)
    layers = [nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 9)]
    net = nn.Sequential(*layers, nn.Tanh(), nn.Linear(9, 5)).to(F64)
    add_lora(net, ["0", "2", "4", "6"], r=r)  # two 9×9 adapters: stacked; 5×9 has 2r > d_out
    if not zero_b:
        with torch.no_grad():
            for _, b, _ in lora_pairs(net):
                b.normal_(0, 0.3)
    return net


def _batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 7, generator=gen, dtype=F64),
             torch.randn(16, 5, generator=gen, dtype=F64)) for _ in range(steps)]  # fmt: skip


def _loss(net, x, y):
    return (net(x) - y).square().mean()


def _train(net, optimiser, batches):
    for x, y in batches:
        optimiser.zero_grad()
        _loss(net, x, y).backward()
        optimiser.step()


def _products(net):
    return [(b @ a).detach() for _, b, a in lora_pairs(net)]


def _gauged(net, seed=5, condition=1.0):
    """A copy of ``net`` with every adapter moved to (B S, S⁻¹A), S random of condition
    10^``condition``."""
    other = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b, a in lora_pairs(other):
            r = a.shape[0]
            q1, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
            q2, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
            s = q1 @ torch.diag(torch.logspace(0, condition, r, dtype=F64)) @ q2
            b.copy_(b @ s)
            a.copy_(torch.linalg.solve(s, a))
    return other


@pytest.mark.parametrize("zero_b", [False, True])
@pytest.mark.parametrize("store", ["direction", "momentum"])
def test_delta_w_is_invariant_under_gl_r(zero_b, store):
    net = _model(zero_b=zero_b)
    other = _gauged(net)
    batches = _batches(20)
    _train(net, Riemannion(net, 1e-2, weight_decay=0.1, store=store), batches)
    _train(other, Riemannion(other, 1e-2, weight_decay=0.1, store=store), batches)
    for w, w_other in zip(_products(net), _products(other)):
        assert torch.linalg.norm(w) > 1e-2  # the adapters moved
        assert (w - w_other).abs().max() < 1e-10


def test_the_control_adamw_is_not_invariant():
    net = _model()
    other = _gauged(net)
    batches = _batches(20)
    for model in (net, other):
        _train(model, torch.optim.AdamW([p for _, b, a in lora_pairs(model) for p in (b, a)],
                                        1e-2, weight_decay=0.0), batches)  # fmt: skip
    gaps = [(w - v).abs().max() for w, v in zip(_products(net), _products(other))]
    assert max(gaps) > 1e-3


# ---- the algorithm on dense matrices, one adapter at a time ----------------------------------


def _tangent(u, v, z):
    """P_X(Z) = U Uᵀ Z + (I − U Uᵀ) Z V Vᵀ for X = U Σ Vᵀ."""
    return u @ (u.T @ z) + (z - u @ (u.T @ z)) @ v @ v.T


def _polar(z, eps):
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    keep = s > eps * s[0]
    return u[:, keep] @ vh[keep]


def _dense_run(net, batches, lr, beta, wd, eps, adjust, store):
    """The dense products after each step: X ← truncSVD_r((1 − ηγ)X − η P_X(polar(m))),
    m = β P_X(stored) + P_X(G), G = ∂L/∂X read from the frozen weight's gradient."""
    layers = [m for m in net.modules() if isinstance(m, LoRALinear)]
    xs = [(m.lora_B @ m.lora_A).detach().clone() for m in layers]
    # at B = 0 the left frame is empty and the right one is A's row space
    frames = [(torch.zeros(m.lora_B.shape[0], 0, dtype=F64),
               torch.linalg.qr(m.lora_A.detach().T)[0]) for m in layers]  # fmt: skip
    frames = [f if torch.linalg.norm(x) == 0 else None for f, x in zip(frames, xs)]
    stored = [torch.zeros_like(x) for x in xs]
    history = []
    for x_in, y in batches:
        for m in layers:
            m.base.weight.requires_grad_(True)
            m.base.weight.grad = None
        _loss(net, x_in, y).backward()
        for i, m in enumerate(layers):
            g = m.scaling * m.base.weight.grad  # ∂L/∂(B A)
            if frames[i] is None:
                u_, _, vh_ = torch.linalg.svd(xs[i])
                r = m.r
                u, v = u_[:, :r], vh_[:r].T
            else:
                u, v = frames[i]
                frames[i] = None
            mom = beta * _tangent(u, v, stored[i]) + _tangent(u, v, g)
            direction = _tangent(u, v, _polar(mom, eps))
            stored[i] = direction if store == "direction" else mom
            eta = lr * (0.2 * max(g.shape) ** 0.5 if adjust else 1.0)
            uu, s, vh = torch.linalg.svd((1 - eta * wd) * xs[i] - eta * direction)
            xs[i] = uu[:, : m.r] @ torch.diag(s[: m.r]) @ vh[: m.r]
            with torch.no_grad():  # any factorisation: the function depends on B A only
                m.lora_B.copy_(uu[:, : m.r] @ torch.diag(s[: m.r]))
                m.lora_A.copy_(vh[: m.r])
        history.append([x.clone() for x in xs])
    for m in layers:
        m.base.weight.requires_grad_(False)
    return history


@pytest.mark.parametrize(
    "zero_b, wd, adjust, store",
    [(False, 0.0, None, "direction"), (True, 0.1, None, "direction"),
     (False, 0.1, "match_rms_adamw", "momentum"), (True, 0.0, None, "momentum")],
)  # fmt: skip
def test_equals_the_algorithm_on_dense_matrices(zero_b, wd, adjust, store):
    net = _model(zero_b=zero_b)
    reference = copy.deepcopy(net)
    batches = _batches(10)
    expected = _dense_run(reference, batches, 3e-2, 0.9, wd, 1e-7, adjust, store)
    opt = Riemannion(net, 3e-2, 0.9, wd, adjust_lr_fn=adjust, store=store)
    for (x, y), want in zip(batches, expected):
        _train(net, opt, [(x, y)])
        for got, w in zip(_products(net), want):
            assert torch.linalg.norm(w) > 1e-2
            assert (got - w).abs().max() < 1e-10
    assert (_products(net)[0] - _products(_model(zero_b=zero_b))[0]).abs().max() > 1e-2


def test_steps_from_b_zero_moving_both_factors_and_nothing_else():
    net = _model(zero_b=True)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    start = [(b.detach().clone(), a.detach().clone()) for _, b, a in lora_pairs(net)]
    _train(net, Riemannion(net, 1e-2), _batches(3))
    for (_, b, a), (b0, a0) in zip(lora_pairs(net), start):
        assert (b - b0).abs().max() > 1e-3 and (a - a0).abs().max() > 1e-3
        assert torch.linalg.matrix_rank(b @ a) == a.shape[0]  # on the manifold of rank r
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


@pytest.mark.parametrize("name", ["riemannion", "riemannion-mom"])
def test_resumes_bit_for_bit(name):
    net = _model(zero_b=True)
    batches = _batches(6)
    opt = build_adapter_optimizer(name, net, 1e-2)
    _train(net, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optim": opt.state_dict()}, buffer)
    _train(net, opt, batches[3:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = _model(zero_b=True)
    again.load_state_dict(saved["model"])
    resumed = build_adapter_optimizer(name, again, 1e-2)
    resumed.load_state_dict(saved["optim"])
    _train(again, resumed, batches[3:])
    for p, q in zip(net.parameters(), again.parameters()):
        assert torch.equal(p, q)
    fresh = _model(zero_b=True)  # the control: without the state the run differs
    fresh.load_state_dict(saved["model"])
    _train(fresh, build_adapter_optimizer(name, fresh, 1e-2), batches[3:])
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), fresh.parameters()))


def test_a_non_finite_step_writes_nothing():
    net = _model()
    opt = Riemannion(net, 1e-2)
    _train(net, opt, _batches(2))
    before = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict())
    x, y = _batches(1, seed=3)[0]
    opt.zero_grad()
    _loss(net, x, y).backward()
    lora_pairs(net)[0][1].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteStepError, match="nothing was written"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k][key], v) for k, s in state["state"].items()
               for key, v in s.items())  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [({"lr": -1.0}, "learning rate"), ({"momentum": 1.0}, "momentum must be in"),
     ({"eps": 0.0}, "eps must be"), ({"adjust_lr_fn": "original"}, "adjust_lr_fn must be"),
     ({"store": "both"}, "store must be one of"), ({"weight_decay": -0.1}, "weight_decay")],
)  # fmt: skip
def test_bad_hyperparameters_name_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Riemannion(_model(), **kwargs)


def test_half_precision_factors_step_in_float32():
    """QR and SVD have no bfloat16 kernels: the step computes in float32 and writes bfloat16,
    close to the float32 run (bfloat16 keeps about 3 significant digits)."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        net = _model().to(dtype)
        opt = Riemannion(net, 1e-2)
        for x, y in _batches(3):
            opt.zero_grad()
            _loss(net, x.to(dtype), y.to(dtype)).backward()
            opt.step()
        state = next(iter(opt.state.values()))
        assert state["stored_left"].dtype == dtype and lora_pairs(net)[0][1].dtype == dtype
        runs[dtype] = [w.float() for w in _products(net)]
    for w32, w16 in zip(runs[torch.float32], runs[torch.bfloat16]):  # measured: 4e-3 to 6e-3
        assert torch.linalg.norm(w16 - w32) < 2e-2 * torch.linalg.norm(w32)
