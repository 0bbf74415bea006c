"""quotopt.lab.baselines: Grokfast, head gauge fixing, random fixed biases and Stiefel heads."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
import torch.nn.functional as F

import manifolds as M
import quotopt
from quotopt.lab.baselines import (
    GaugeFixedAdamW,
    GrokfastAdamW,
    add_random_biases,
    fix_head_gauge,
    gauge_fixed_adamw,
    geoopt_stiefel_adam,
    grokfast,
    random_bias_adamw,
)
from quotopt.models import Transformer

LR, WD, BETAS = 1e-2, 0.1, (0.9, 0.99)


def _tiny(dtype=torch.float32, n_layers=1) -> Transformer:
    model = Transformer(vocab_size=7, d_model=8, n_layers=n_layers, n_heads=2, max_len=4)
    return model.to(dtype)


def _batches(count=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 7, (5, 4), generator=gen) for _ in range(count)]


def _loss(model, tokens):
    # Memorise the token at each position: a task every baseline can learn in a few steps.
    return F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def _train(model, optimiser, batches):
    losses = []
    for tokens in batches:
        optimiser.zero_grad(set_to_none=True)
        loss = _loss(model, tokens)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def _reloaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resumes_bit_for_bit(model, make_optimiser):
    """Train, checkpoint (weights_only), resume in a copy: both continue identically."""
    optimiser = make_optimiser(model)
    _train(model, optimiser, _batches(3, seed=2))
    twin = copy.deepcopy(model)
    twin_optimiser = make_optimiser(twin)
    twin_optimiser.load_state_dict(_reloaded(optimiser.state_dict()))
    _train(model, optimiser, _batches(3, seed=3))
    _train(twin, twin_optimiser, _batches(3, seed=3))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


# ---- Grokfast --------------------------------------------------------------------------------


def _paper_filter(model, ema, alpha, lamb):
    """Grokfast's gradfilter_ema as in the paper's code: the EMA starts at the first gradient."""
    for name, p in model.named_parameters():
        previous = ema.get(name, p.grad.detach().clone())
        ema[name] = previous * alpha + p.grad.detach() * (1 - alpha)
        p.grad = p.grad + ema[name] * lamb


def test_grokfast_matches_reference_filter_then_adamw():
    model = _tiny(torch.float64)
    reference = copy.deepcopy(model)
    optimiser = GrokfastAdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    plain = torch.optim.AdamW(reference.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    ema = {}
    for tokens in _batches():
        optimiser.zero_grad()
        _loss(model, tokens).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimiser.step()
        plain.zero_grad()
        _loss(reference, tokens).backward()
        _paper_filter(reference, ema, alpha=0.98, lamb=2.0)
        plain.step()
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, raw[name]), f"{name}: p.grad was modified"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(
            optimiser.state[p]["grokfast_ema"], ema[name], rtol=0, atol=1e-12, msg=name
        )


def test_grokfast_state_dict_round_trip_resumes_bit_for_bit():
    _resumes_bit_for_bit(_tiny(torch.float64), lambda m: grokfast(m, LR, WD, BETAS))


def test_grokfast_group_options_override_and_are_checked():
    model = _tiny(torch.float64)
    reference = copy.deepcopy(model)
    groups = [{"params": list(model.parameters()), "lamb": 0.0}]
    optimiser = GrokfastAdamW(groups, lr=LR, betas=BETAS, weight_decay=WD, alpha=0.5)
    assert optimiser.param_groups[0]["alpha"] == 0.5
    # λ = 0 removes the filter: exactly AdamW.
    plain = torch.optim.AdamW(reference.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    _train(model, optimiser, _batches(3))
    _train(reference, plain, _batches(3))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="Invalid alpha"):
        GrokfastAdamW(model.parameters(), alpha=1.5)
    with pytest.raises(ValueError, match="Invalid lamb"):
        optimiser.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lamb": -1})


def test_grokfast_closure_and_step_hooks_run_once():
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # makes torch hook AdamW.step
    model = _tiny()
    optimiser = grokfast(model, LR, WD, BETAS)
    calls = []
    optimiser.register_step_post_hook(lambda *args: calls.append(1))
    tokens = _batches(1)[0]

    def closure():
        optimiser.zero_grad()
        loss = _loss(model, tokens)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = optimiser.step(closure)
    assert loss is not None and calls == [1]
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---- gauge fixing ----------------------------------------------------------------------------


def test_fix_head_gauge_keeps_the_function_and_sets_identity_blocks():
    model = _tiny(torch.float64, n_layers=2)
    tokens = _batches(1)[0]
    before = model(tokens)
    old_wq = model.blocks[0].attn.wq.detach().clone()
    fix_head_gauge(model)
    after = model(tokens)
    assert (after - before).norm() / before.norm() <= 1e-9
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    for block in model.blocks:
        assert torch.equal(block.attn.wq[:, :4], eye)
        assert torch.equal(block.attn.wv[:, :4], eye)
    assert (model.blocks[0].attn.wq - old_wq).abs().max() > 1e-2


def test_fix_head_gauge_names_a_singular_block_and_writes_nothing():
    model = _tiny(torch.float64, n_layers=2)
    with torch.no_grad():
        model.blocks[1].attn.wv[1, 0] = model.blocks[1].attn.wv[1, 1]  # rank-deficient top
    saved = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.wv head 1: .*condition number"):
        fix_head_gauge(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_gauge_fixed_adamw_holds_the_blocks_and_moves_the_rest():
    model = _tiny(torch.float64)
    optimiser = gauge_fixed_adamw(model, LR, WD, BETAS)
    attn = model.blocks[0].attn
    start = {n: p.detach().clone() for n, p in attn.named_parameters()}
    losses = _train(model, optimiser, _batches(8))
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    assert torch.equal(attn.wq[:, :4], eye) and torch.equal(attn.wv[:, :4], eye)
    for p in (attn.wq, attn.wv):  # the fixed blocks are no coordinates: no moments either
        assert not optimiser.state[p]["exp_avg"][:, :4].any()
    for name in ("wq", "wv"):
        assert (getattr(attn, name)[:, 4:] - start[name][:, 4:]).abs().min() > 0, name
    for name in ("wk", "wo"):
        assert (getattr(attn, name) - start[name]).abs().max() > 1e-3, name
    assert losses[-1] < losses[0]


def test_gauge_fixed_adamw_round_trip_and_rejects_unfixed_blocks():
    model = _tiny(torch.float64)
    _resumes_bit_for_bit(model, lambda m: gauge_fixed_adamw(m, LR, WD, BETAS))
    unfixed = _tiny()
    with pytest.raises(ValueError, match="fix_head_gauge"):
        GaugeFixedAdamW([{"params": [unfixed.blocks[0].attn.wq], "identity_block": True}])


# ---- random biases ---------------------------------------------------------------------------


def test_default_path_unchanged_without_biases():
    tokens = _batches(1)[0]
    torch.manual_seed(0)
    fresh = _tiny()
    torch.manual_seed(0)
    model = _tiny()
    add_random_biases(model)
    assert not torch.equal(model(tokens), fresh(tokens))
    for block in model.blocks:
        block.attn.q_bias = None
        block.attn.v_bias = None
    assert torch.equal(model(tokens), fresh(tokens))
    assert model.state_dict().keys() == fresh.state_dict().keys()


def test_random_biases_are_fixed_buffers_that_survive_state_dict():
    model = _tiny()
    names = [n for n, _ in model.named_parameters()]
    optimiser = random_bias_adamw(model, LR, WD, BETAS)
    assert [n for n, _ in model.named_parameters()] == names
    attn = model.blocks[0].attn
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= dict(model.named_buffers()).keys()
    biases = (attn.q_bias.clone(), attn.v_bias.clone())
    assert biases[0].shape == (2, 4)
    _train(model, optimiser, _batches(3))
    assert torch.equal(attn.q_bias, biases[0]) and torch.equal(attn.v_bias, biases[1])
    state = _reloaded(model.state_dict())
    with pytest.raises(RuntimeError, match="q_bias"):
        _tiny().load_state_dict(state)
    loaded = _tiny()
    add_random_biases(loaded, generator=torch.Generator().manual_seed(5))
    loaded.load_state_dict(state)
    tokens = _batches(1)[0]
    assert torch.equal(loaded(tokens), model(tokens))


def test_random_bias_adamw_draws_from_the_global_seed():
    drawn = []
    for _ in range(2):
        model = _tiny()
        torch.manual_seed(3)
        random_bias_adamw(model, LR, WD, BETAS)
        drawn.append(model.blocks[0].attn.q_bias)
    assert torch.equal(*drawn)


def test_symmetries_drop_the_head_bundles_a_bias_breaks():
    model = _tiny(n_layers=2)
    assert {"blocks.0.attn.qk", "blocks.0.attn.ov"} <= {
        g["name"] for g in quotopt.symmetries(model)
    }
    add_random_biases(model)
    model.blocks[1].attn.v_bias = None  # layer 1 keeps only its query bias
    groups = {g["name"]: g for g in quotopt.symmetries(model)}
    assert groups.keys() == {"blocks.1.attn.ov", "plain"}
    plain = {id(p) for p in groups["plain"]["params"]}
    first, second = model.blocks[0].attn, model.blocks[1].attn
    assert {id(first.wq), id(first.wk), id(first.wv), id(first.wo)} <= plain
    assert {id(second.wq), id(second.wk)} <= plain


def _stabiliser(bias: torch.Tensor, generator) -> torch.Tensor:
    """g = I + w zᵀ per head with b w = 0, so b g = b (the part of GL(r) a bias leaves)."""
    heads, r = bias.shape
    w = torch.randn(heads, r, generator=generator, dtype=bias.dtype)
    w -= (w * bias).sum(-1, keepdim=True) / (bias * bias).sum(-1, keepdim=True) * bias
    z = torch.randn(heads, r, generator=generator, dtype=bias.dtype)
    return torch.eye(r, dtype=bias.dtype) + w[:, :, None] * z[:, None, :]  # (H, r, r)


def test_biases_break_generic_gl_but_keep_their_stabiliser():
    model = _tiny(torch.float64)
    tokens = _batches(1)[0]
    attn = model.blocks[0].attn
    pairs = {
        "qk": {"params": [attn.wq, attn.wk], "bundle": M.HeadQK(2, 8, 4), "name": "qk"},
        "ov": {"params": [attn.wv, attn.wo], "bundle": M.HeadOV(2, 8, 4), "name": "ov"},
    }
    exact = quotopt.verify(model, list(pairs.values()), tokens)
    assert max(exact.values()) < 1e-12
    add_random_biases(model)
    broken = quotopt.verify(model, list(pairs.values()), tokens)
    assert min(broken.values()) > 1e-3
    gen = torch.Generator().manual_seed(4)
    before = model(tokens)
    for name, bias in (("qk", attn.q_bias), ("ov", attn.v_bias)):
        group = pairs[name]
        with torch.no_grad():
            point = group["bundle"].act(tuple(group["params"]), _stabiliser(bias, gen))
            for p, value in zip(group["params"], point):
                p.copy_(value)
    assert (model(tokens) - before).norm() / before.norm() < 1e-12


# ---- Stiefel heads ---------------------------------------------------------------------------


def test_stiefel_heads_stay_orthonormal_and_train():
    pytest.importorskip("geoopt")
    model = _tiny()
    optimiser = geoopt_stiefel_adam(model, LR, WD, BETAS)
    losses = _train(model, optimiser, _batches(1) * 30)
    eye = torch.eye(4).expand(2, 4, 4)
    for name in ("wq", "wk", "wv"):
        w = getattr(model.blocks[0].attn, name)
        torch.testing.assert_close(w.mT @ w, eye, rtol=0, atol=1e-5, msg=name)
    assert losses[-1] < 0.8 * losses[0]


def test_stiefel_without_geoopt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "geoopt", None)
    with pytest.raises(ImportError, match="pip install"):
        geoopt_stiefel_adam(_tiny(), LR, WD, BETAS)


# ---- all factories ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory", [grokfast, gauge_fixed_adamw, random_bias_adamw, geoopt_stiefel_adam]
)
def test_every_factory_trains_the_tiny_transformer(factory):
    if factory is geoopt_stiefel_adam:
        pytest.importorskip("geoopt")
    model = _tiny()
    optimiser = factory(model, LR, WD, BETAS)
    assert isinstance(optimiser, torch.optim.Optimizer)
    losses = _train(model, optimiser, _batches(1) * 25)
    assert losses[-1] < 0.5 * losses[0]
