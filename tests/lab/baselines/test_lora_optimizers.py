"""The LoRA optimisers that step adapter pairs: BaLoRA is balanced after every step with
AdamW's ΔW; QuotientMatrixAdam's ΔW does not depend on the representative (B S, S⁻¹A) (the
control without dressing does); every new name of the fine-tuning registry resumes bit for bit
from a state_dict loaded with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import copy

import pytest
import torch

from quotopt.groups import lora_pairs, orthonormal_start
from quotopt.lab.baselines.balora import BaLoRA
from quotopt.lab.training.optimizers import build_adapter_optimizer
from quotopt.optim import NonFiniteStepError
from quotopt.optim.matrix_adam import QuotientMatrixAdam
from tests.lab.baselines import adapters as toy
from tests.lab.baselines.adapters import F64


def test_balora_is_balanced_after_every_step_with_adamw_s_product():
    net = toy.model()
    twin = copy.deepcopy(net)
    opt = BaLoRA(net, 1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW([p for _, b, a in lora_pairs(twin) for p in (b, a)], 1e-2,
                              weight_decay=0.1)  # fmt: skip
    for x, y in toy.batches(8):
        with torch.no_grad():  # AdamW from the same point: only its state evolves alone
            for p, q in zip(twin.parameters(), net.parameters()):
                p.copy_(q)
        for model, optimiser in ((net, opt), (twin, adamw)):
            optimiser.zero_grad()
            toy.loss(model, x, y).backward()
            optimiser.step()
        for (_, b, a), (_, tb, ta) in zip(lora_pairs(net), lora_pairs(twin)):
            gram = b.T @ b
            assert ((gram - a @ a.T).abs().max() / gram.abs().max()) < 1e-10
            assert torch.allclose(b @ a, tb @ ta, rtol=0, atol=1e-12)
            assert (tb.T @ tb - ta @ ta.T).abs().max() > 1e-3  # the control: AdamW's is not
    assert opt.balance_gap() < 1e-10


@pytest.mark.parametrize("zero_b", [False, True])
def test_matrix_adam_delta_w_is_invariant_under_gl_r(zero_b):
    net = toy.model(zero_b=zero_b)
    other = toy.gauged(net)
    batches = toy.batches(20)
    toy.train(net, QuotientMatrixAdam(net, 1e-2, weight_decay=0.1), batches)
    toy.train(other, QuotientMatrixAdam(other, 1e-2, weight_decay=0.1), batches)
    for w, w_other in zip(toy.products(net), toy.products(other)):
        assert torch.linalg.norm(w) > 1e-2
        assert (w - w_other).abs().max() < 1e-10


def test_the_control_matrix_adam_without_dressing_is_not_invariant():
    net = toy.model()
    other = toy.gauged(net)
    batches = toy.batches(20)
    toy.train(net, QuotientMatrixAdam(net, 1e-2, dress=False), batches)
    toy.train(other, QuotientMatrixAdam(other, 1e-2, dress=False), batches)
    gaps = [(w - v).abs().max() for w, v in zip(toy.products(net), toy.products(other))]
    assert max(gaps) > 1e-3


NEW = ["lora-rite", "balora", "qmuon", "qadam-mat"]


@pytest.mark.parametrize("name", NEW + ["riemannion", "riemannion-mom"])
def test_resumes_bit_for_bit(name):
    net, resumed, fresh = toy.resumed_run(lambda m: build_adapter_optimizer(name, m, 1e-2))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), resumed.parameters()))
    # the control: continued from the saved weights without the state, the run differs
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), fresh.parameters()))


def test_a_non_finite_step_writes_nothing():
    net = toy.model()
    opt = QuotientMatrixAdam(net, 1e-2)
    toy.train(net, opt, toy.batches(2))
    before = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict())
    x, y = toy.batches(1)[0]
    opt.zero_grad()
    toy.loss(net, x, y).backward()
    next(p for _, b, _ in lora_pairs(net) for p in (b,)).grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteStepError, match="nothing was written"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k][key], v) for k, s in state["state"].items()
               for key, v in s.items())  # fmt: skip


def test_pairs_are_the_factors_of_one_module():
    net = toy.model(r=2)
    opt = QuotientMatrixAdam(net)
    layers = {f"{path}:lora": (m.lora_B, m.lora_A) for path, m in net.named_modules()
              if hasattr(m, "lora_A")}  # fmt: skip
    seen = []
    for group in opt.param_groups:
        params = group["params"]
        for i, name in enumerate(group["adapters"]):
            assert params[2 * i] is layers[name][0] and params[2 * i + 1] is layers[name][1]
            seen.append(name)
    assert sorted(seen) == sorted(layers) and F64 == params[0].dtype
    assert sorted(len(g["adapters"]) for g in opt.param_groups) == [1, 1, 2]  # stacked by shape


def _qmuon(model, dress_every=1):
    from quotopt import symmetries
    from quotopt.optim import QuotientMuon

    orthonormal_start(model)
    groups = symmetries(model, metric="euclidean", plain=False)
    return QuotientMuon(groups, 1e-2, 0.0, scope="head", adjust_lr_fn="match_rms_adamw",
                        dress_every=dress_every)  # fmt: skip


@pytest.mark.parametrize("zero_b", [False, True])
def test_qmuon_delta_w_is_invariant_under_gl_r(zero_b):
    net = toy.model(zero_b=zero_b)
    other = toy.gauged(net)
    batches = toy.batches(20)
    toy.train(net, _qmuon(net), batches)
    toy.train(other, _qmuon(other), batches)
    for w, w_other in zip(toy.products(net), toy.products(other)):
        assert torch.linalg.norm(w) > 1e-2
        assert (w - w_other).abs().max() < 1e-10


def test_the_control_qmuon_never_dressed_is_not_invariant():
    net = toy.model()
    other = toy.gauged(net)
    batches = toy.batches(20)
    toy.train(net, _qmuon(net, dress_every=None), batches)
    toy.train(other, _qmuon(other, dress_every=None), batches)
    gaps = [(w - v).abs().max() for w, v in zip(toy.products(net), toy.products(other))]
    assert max(gaps) > 1e-3


def test_the_control_qmuon_from_b_zero_needs_the_orthonormal_start():
    """Without it, the first step from B = 0 (no dressing there) depends on A's gauge."""
    from quotopt import symmetries
    from quotopt.optim import QuotientMuon

    net = toy.model(zero_b=True)
    other = toy.gauged(net)
    batches = toy.batches(20)
    for model in (net, other):
        groups = symmetries(model, metric="euclidean", plain=False)
        toy.train(model, QuotientMuon(groups, 1e-2, 0.0, adjust_lr_fn="match_rms_adamw"), batches)
    gaps = [(w - v).abs().max() for w, v in zip(toy.products(net), toy.products(other))]
    assert max(gaps) > 1e-3
