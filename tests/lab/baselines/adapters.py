"""The toy adapter model, data and checks that the LoRA optimisers' tests share: a float64 MLP
with LoRA adapters (``quotopt.groups.add_lora``) on its four linear layers — two 9 × 9 adapters
of one shape, which stack, and a 5 × 9 one whose 2r exceeds its output size —, regression
batches, and the gauge move (B, A) → (B S, S⁻¹A) of every adapter."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from quotopt.groups import add_lora, lora_pairs

F64 = torch.float64


def model(seed=0, zero_b=False, r=3):
    torch.manual_seed(seed)
    layers = [nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 9)]
    net = nn.Sequential(*layers, nn.Tanh(), nn.Linear(9, 5)).to(F64)
    add_lora(net, ["0", "2", "4", "6"], r=r)
    if not zero_b:
        with torch.no_grad():
            for _, b, _ in lora_pairs(net):
                b.normal_(0, 0.3)
    return net


def batches(steps, seed=1, scale=1.0):
    """``steps`` batches of 16 inputs and targets (the targets times ``scale``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 7, generator=gen, dtype=F64)
        out.append((x, scale * torch.randn(16, 5, generator=gen, dtype=F64)))
    return out


def loss(net, x, y):
    return (net(x) - y).square().mean()


def train(net, optimiser, data):
    for x, y in data:
        optimiser.zero_grad()
        loss(net, x, y).backward()
        optimiser.step()


def products(net):
    """Every adapter's ΔW = B A (the function's part the optimisers must agree on)."""
    return [(b @ a).detach() for _, b, a in lora_pairs(net)]


def gauged(net, seed=5, condition=10.0):
    """A copy of ``net`` with every adapter moved to (B S, S⁻¹A), S random of this condition
    number."""
    other = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b, a in lora_pairs(other):
            r = a.shape[0]
            q1, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
            q2, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
            spectrum = torch.logspace(0, torch.log10(torch.tensor(condition)), r, dtype=F64)
            s = q1 @ torch.diag(spectrum) @ q2
            b.copy_(b @ s)
            a.copy_(torch.linalg.solve(s, a))
    return other


def resumed_run(build, steps=6):
    """(uninterrupted, resumed, fresh) models after ``steps`` steps from B = 0: the second
    saved after half of them (``torch.load(weights_only=True)``) and resumed in a new model and
    optimiser; the third, the control, continued from the saved weights without the state."""
    net, data = model(zero_b=True), batches(steps)
    half = steps // 2
    opt = build(net)
    train(net, opt, data[:half])
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optim": opt.state_dict()}, buffer)
    train(net, opt, data[half:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = model(zero_b=True)
    again.load_state_dict(saved["model"])
    resumed = build(again)
    resumed.load_state_dict(saved["optim"])
    train(again, resumed, data[half:])
    fresh = model(zero_b=True)
    fresh.load_state_dict(saved["model"])
    train(fresh, build(fresh), data[half:])
    return net, again, fresh
