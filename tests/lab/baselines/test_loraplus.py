"""LoRA baselines: LoRA+ (Hayou, Ghosh & Yu 2024) — ratio 1 is AdamW on the adapters, a ratio λ
scales B's steps by λ, everything but the adapters must be frozen — and scaled GD (Zhang &
Pilanci 2024), which is QuotientSGD under the invariant metric."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quotopt.groups import add_lora, lora_pairs
from quotopt.lab.baselines import lora_plus

F64 = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).to(F64)
    add_lora(net, ["0", "2"], r=2)
    with torch.no_grad():  # a nonzero B, so that A has gradients too
        for _, b, _ in lora_pairs(net):
            b.normal_(0, 0.1)
    return net


def _train(net, optimiser, steps=5):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=F64)
        loss = net(x).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return [p.detach().clone() for _, b, a in lora_pairs(net) for p in (b, a)]


def test_ratio_one_is_adamw_on_the_adapters():
    net_plus, net_adamw = _model(), _model()
    plus = lora_plus(net_plus, lr=1e-2, weight_decay=0.1, ratio=1.0)
    params = [p for _, b, a in lora_pairs(net_adamw) for p in (a, b)]
    adamw = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for x, y in zip(_train(net_plus, plus), _train(net_adamw, adamw)):
        assert torch.allclose(x, y, rtol=0, atol=1e-12)


def test_a_ratio_scales_the_steps_of_b_only():
    """Adam's first step is lr·g/(|g| + eps): with ratio λ, B moves λ times as far, A the same."""
    base = _model()
    runs = {}
    for ratio in (1.0, 16.0):
        net = copy.deepcopy(base)
        before = [p.detach().clone() for _, b, a in lora_pairs(net) for p in (b, a)]
        after = _train(net, lora_plus(net, lr=1e-3, ratio=ratio), steps=1)
        runs[ratio] = [x - y for x, y in zip(after, before)]
    for i, (one, sixteen) in enumerate(zip(runs[1.0], runs[16.0])):
        expected = 16.0 if i % 2 == 0 else 1.0  # (B, A) per pair
        assert torch.allclose(sixteen, expected * one, rtol=1e-6, atol=1e-12)


def test_lora_plus_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="no trainable LoRA adapters"):
        lora_plus(nn.Linear(3, 3))
    net = _model()
    net[0].base.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="outside the adapters"):
        lora_plus(net)
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        lora_plus(_model(), ratio=0)


def test_scaled_gd_is_quotient_sgd_under_the_invariant_metric():
    """Zhang & Pilanci's scaled GD for ΔW = B A — B ← B − η∇_B(AAᵀ)⁻¹, A ← A − η(BᵀB)⁻¹∇_A,
    their δ = 0 — is QuotientSGD on the adapter's HeadOV bundle (point (B, A), action
    (B g, g⁻¹A)) with the undamped invariant metric, no momentum, no re-dressing: equal to
    1e-12 over 20 steps (the step bound stays inactive at this step size). The control: the
    Euclidean metric is plain GD and differs."""
    import manifolds as M
    from quotopt import QuotientSGD

    gen = torch.Generator().manual_seed(0)
    b0 = torch.randn(1, 8, 3, generator=gen, dtype=F64) / 3
    a0 = torch.randn(1, 3, 6, generator=gen, dtype=F64) / 3
    target = torch.randn(8, 6, generator=gen, dtype=F64)

    def loss(b, a):
        return 0.5 * (b[0] @ a[0] - target).square().sum()

    def quotient(metric):
        b, a = b0.clone().requires_grad_(), a0.clone().requires_grad_()
        bundle = M.HeadOV(1, 8, 3, metric=metric, factor_rows=(8, 6))
        opt = QuotientSGD([{"params": [b, a], "bundle": bundle}], lr=1e-2, dress_every=None)
        for _ in range(20):
            opt.zero_grad()
            loss(b, a).backward()
            opt.step()
        return b.detach(), a.detach()

    b, a = b0.clone(), a0.clone()
    for _ in range(20):
        bg, ag = (t.requires_grad_() for t in (b.clone(), a.clone()))
        grad_b, grad_a = torch.autograd.grad(loss(bg, ag), (bg, ag))
        b = b - 1e-2 * grad_b @ torch.linalg.inv(a @ a.mT)
        old_b = bg.detach()
        a = a - 1e-2 * torch.linalg.inv(old_b.mT @ old_b) @ grad_a
    qb, qa = quotient("invariant")
    assert torch.allclose(qb, b, rtol=0, atol=1e-12) and torch.allclose(qa, a, rtol=0, atol=1e-12)
    eb, _ = quotient("euclidean")
    assert not torch.allclose(eb, b, rtol=0, atol=1e-6)
