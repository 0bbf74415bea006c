"""LoRA-RITE (Yen et al., ICLR 2025): ΔW = B A is invariant under (B, A) → (B S, S⁻¹A) for any
S ∈ GL(r) (AdamW's is not: the control), and the port equals the published algorithm, written
out below one adapter at a time in the reference's own orientation, on a toy model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quotopt.groups import lora_pairs
from quotopt.lab.baselines.lora_rite import LoRARITE
from tests.lab.baselines import adapters as toy
from tests.lab.baselines.adapters import F64


@pytest.mark.parametrize("zero_b", [False, True])
@pytest.mark.parametrize("escaped_mass", [False, True])
def test_delta_w_is_invariant_under_gl_r(zero_b, escaped_mass):
    net = toy.model(zero_b=zero_b)
    other = toy.gauged(net)
    batches = toy.batches(20)
    toy.train(net, LoRARITE(net, 1e-2, escaped_mass=escaped_mass), batches)
    toy.train(other, LoRARITE(other, 1e-2, escaped_mass=escaped_mass), batches)
    for w, w_other in zip(toy.products(net), toy.products(other)):
        assert torch.linalg.norm(w) > 1e-2  # the adapters moved
        assert (w - w_other).abs().max() < 1e-10


def test_the_control_adamw_is_not_invariant():
    net = toy.model()
    other = toy.gauged(net)
    batches = toy.batches(20)
    for model in (net, other):
        toy.train(model, torch.optim.AdamW([p for _, b, a in lora_pairs(model) for p in (b, a)],
                                        1e-2, weight_decay=0.0), batches)  # fmt: skip
    gaps = [(w - v).abs().max() for w, v in zip(toy.products(net), toy.products(other))]
    assert max(gaps) > 1e-3


# ---- the published algorithm, one adapter at a time ------------------------------------------
# In the reference's orientation: per adapter the "left" factor is Aᵀ (d_in, r), the "right" one
# B (d_out, r); each factor's gradient is unmagnified by the other's triangular factor.


def _decay(count, beta):
    t = count + 1.0
    return beta * (1.0 - beta ** (t - 1.0)) / (1.0 - beta**t)


def _inv_root(v, escape, eps):
    w, q = torch.linalg.eigh(v)
    w = 1 / (torch.sqrt(w + escape) + eps)
    out = (q * w.unsqueeze(0)) @ q.T
    return (out + out.T) / 2


def _escape(new, old):
    gap = torch.clamp((torch.linalg.eigvalsh(old) - torch.linalg.eigvalsh(new)).max(), min=0)
    trace = torch.clamp(torch.trace(old) - torch.trace(new), min=0)
    return torch.minimum(gap, trace)


def _reference_step(pairs, states, lr, beta1, beta2, eps, wd, clip, skip, escape_on):
    staged, total, skipped = [], 0.0, False
    for (left, right), st in zip(pairs, states):
        xl, xr = left.detach().T, right.detach()  # A ᵀ and B
        gl, gr = left.grad.T, right.grad
        ql, rl = torch.linalg.qr(xl)
        qr_, rr = torch.linalg.qr(xr)
        il, ir = torch.linalg.pinv(rl), torch.linalg.pinv(rr)
        ul, ur = gl @ ir, gr @ il
        if torch.sqrt(torch.mean(ul**2)) > skip:
            ul, skipped = torch.zeros_like(ul), True
        if torch.sqrt(torch.mean(ur**2)) > skip:
            ur, skipped = torch.zeros_like(ur), True
        pl, pr = qr_.T @ st["basis_r"], ql.T @ st["basis_l"]
        st["basis_l"], st["basis_r"] = ql, qr_
        total = total + torch.linalg.norm(ul) ** 2 + torch.linalg.norm(ur) ** 2
        staged.append((ul, ur, pl, pr, il, ir))
    norm = torch.sqrt(total)
    clipped = bool(norm > clip)
    for (left, right), st, (ul, ur, pl, pr, il, ir) in zip(pairs, states, staged):
        if clipped:
            ul, ur = ul / norm * clip, ur / norm * clip
        count = st["step"]
        b1, b2 = _decay(count, beta1), _decay(count, beta2)
        new = {}
        for side, u, p in (("l", ul, pl), ("r", ur, pr)):
            s = u.T @ u / u.shape[0]
            s = (s + s.T) / 2
            moved = p @ st["v_" + side] @ p.T
            moved = (moved + moved.T) / 2
            esc = 0.0
            if escape_on:
                esc = b2 * (_escape(moved, st["v_" + side]) + st["e_" + side])
                st["e_" + side] = esc
            v = (1 - b2) * s + b2 * moved
            v = (v + v.T) / 2
            st["v_" + side] = v
            pre = u @ _inv_root(v, esc, eps)
            m = (1 - b1) * pre + b1 * (st["m_" + side] @ p.T)
            st["m_" + side] = m
            new[side] = m
        with torch.no_grad():
            xl, xr = left.T, right
            dl = -lr * (new["l"] @ ir.T + wd * xl)
            dr = -lr * (new["r"] @ il.T + wd * xr)
            left.add_(dl.T)
            right.add_(dr)
        st["step"] = count + 1
    return clipped, skipped


@pytest.mark.parametrize("escape_on", [False, True])
@pytest.mark.parametrize("zero_b", [False, True])
def test_equals_the_published_algorithm(escape_on, zero_b):
    net = toy.model(zero_b=zero_b)
    ref = copy.deepcopy(net)
    hyper = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-6, wd=0.1, clip=1.0, skip=1.0)
    opt = LoRARITE(net, hyper["lr"], (hyper["beta1"], hyper["beta2"]), hyper["eps"],
                   hyper["wd"], escaped_mass=escape_on)  # fmt: skip
    pairs = [(a, b) for _, b, a in lora_pairs(ref)]
    states = []
    for a, b in pairs:
        r = a.shape[0]

        def zeros(rows, r=r):
            return torch.zeros(rows, r, dtype=F64)

        states.append(dict(step=0, basis_l=zeros(a.shape[1]), basis_r=zeros(b.shape[0]),
                           m_l=zeros(a.shape[1]), m_r=zeros(b.shape[0]), v_l=zeros(r),
                           v_r=zeros(r), e_l=0.0, e_r=0.0))  # fmt: skip
    flags = []
    for step, (x, y) in enumerate(toy.batches(10, scale=3.0)):
        weight = (1e-2, 1.0, 30.0)[step % 3]  # unclipped, clipped, skipped gradients
        for model in (net, ref):
            model.zero_grad()
            (weight * (model(x) - y).square().mean()).backward()
        opt.step()
        flags.append(_reference_step(pairs, states, escape_on=escape_on, **hyper))
        for (_, b, a), (ra, rb) in zip(lora_pairs(net), pairs):
            assert (b - rb).abs().max() < 1e-12 and (a - ra).abs().max() < 1e-12
    clipped, skipped = zip(*flags)
    assert any(clipped) and not all(clipped)  # the clipping took part, and was not always on
    assert any(skipped)  # so did the skipping
    assert all(torch.linalg.norm(b) > 0 for _, b, _ in lora_pairs(net))


def test_bad_hyperparameters_name_the_rule():
    net = toy.model()
    with pytest.raises(ValueError, match="clip must be a finite number ≥ 0, got -1"):
        LoRARITE(net, clip=-1)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.0"):
        LoRARITE(net, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="no trainable LoRA adapters"):
        LoRARITE(nn.Linear(3, 3).requires_grad_(False))
