"""Riemannion (Bogachev et al., ICLR 2026): ΔW = B A is invariant under (B, A) → (B S, S⁻¹A) for
any S ∈ GL(r) (AdamW's is not: the control in ``test_lora_rite``); the factored port equals the
algorithm written out below on dense matrices (tangent projection, transported momentum, SVD
polar factor, truncated SVD retraction); it steps from B = 0 and writes nothing on a non-finite
step (it resumes bit for bit: ``test_lora_optimizers``)."""

from __future__ import annotations

import copy

import pytest
import torch

from quotopt.groups import LoRALinear, lora_pairs
from quotopt.lab.baselines.riemannion import Riemannion
from quotopt.optim import NonFiniteStepError
from tests.lab.baselines import adapters as toy
from tests.lab.baselines.adapters import F64


@pytest.mark.parametrize("zero_b", [False, True])
@pytest.mark.parametrize("store", ["direction", "momentum"])
def test_delta_w_is_invariant_under_gl_r(zero_b, store):
    net = toy.model(zero_b=zero_b)
    other = toy.gauged(net)
    batches = toy.batches(20)
    toy.train(net, Riemannion(net, 1e-2, weight_decay=0.1, store=store), batches)
    toy.train(other, Riemannion(other, 1e-2, weight_decay=0.1, store=store), batches)
    for w, w_other in zip(toy.products(net), toy.products(other)):
        assert torch.linalg.norm(w) > 1e-2  # the adapters moved
        assert (w - w_other).abs().max() < 1e-10


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
        toy.loss(net, x_in, y).backward()
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
    net = toy.model(zero_b=zero_b)
    reference = copy.deepcopy(net)
    batches = toy.batches(10)
    expected = _dense_run(reference, batches, 3e-2, 0.9, wd, 1e-7, adjust, store)
    opt = Riemannion(net, 3e-2, 0.9, wd, adjust_lr_fn=adjust, store=store)
    for (x, y), want in zip(batches, expected):
        toy.train(net, opt, [(x, y)])
        for got, w in zip(toy.products(net), want):
            assert torch.linalg.norm(w) > 1e-2
            assert (got - w).abs().max() < 1e-10
    assert (toy.products(net)[0] - toy.products(toy.model(zero_b=zero_b))[0]).abs().max() > 1e-2


def test_steps_from_b_zero_moving_both_factors_and_nothing_else():
    net = toy.model(zero_b=True)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    start = [(b.detach().clone(), a.detach().clone()) for _, b, a in lora_pairs(net)]
    toy.train(net, Riemannion(net, 1e-2), toy.batches(3))
    for (_, b, a), (b0, a0) in zip(lora_pairs(net), start):
        assert (b - b0).abs().max() > 1e-3 and (a - a0).abs().max() > 1e-3
        assert torch.linalg.matrix_rank(b @ a) == a.shape[0]  # on the manifold of rank r
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_a_non_finite_step_writes_nothing():
    net = toy.model()
    opt = Riemannion(net, 1e-2)
    toy.train(net, opt, toy.batches(2))
    before = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict())
    x, y = toy.batches(1, seed=3)[0]
    opt.zero_grad()
    toy.loss(net, x, y).backward()
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
        Riemannion(toy.model(), **kwargs)


def test_half_precision_factors_step_in_float32():
    """QR and SVD have no bfloat16 kernels: the step computes in float32 and writes bfloat16,
    close to the float32 run (bfloat16 keeps about 3 significant digits)."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        net = toy.model().to(dtype)
        opt = Riemannion(net, 1e-2)
        for x, y in toy.batches(3):
            opt.zero_grad()
            toy.loss(net, x.to(dtype), y.to(dtype)).backward()
            opt.step()
        state = next(iter(opt.state.values()))
        assert state["stored_left"].dtype == dtype and lora_pairs(net)[0][1].dtype == dtype
        runs[dtype] = [w.float() for w in toy.products(net)]
    for w32, w16 in zip(runs[torch.float32], runs[torch.bfloat16]):  # measured: 4e-3 to 6e-3
        assert torch.linalg.norm(w16 - w32) < 2e-2 * torch.linalg.norm(w32)
