"""QuotientMuon on products of factored bundles (fused q/k/v, ``nn.MultiheadAttention``, partial
rotary): it trains and is gauge-equivariant, with a failing control; and the hyperparameter
rules every quotient optimiser shares (torch-style messages, values that would misbehave)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manifolds as M
from manifolds.testing import relative_error
from quotopt import QuotientAdam, QuotientMuon, QuotientSGD, gauge_transform, symmetries

transformers = pytest.importorskip("transformers")
F64 = torch.float64
VOCAB = 13


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``conftest.one_thread``)."""


class _MultiheadLM(nn.Module):
    """Embedding, one ``nn.MultiheadAttention`` (fused in_proj q/k/v with biases), read-out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, d)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=VOCAB, n_positions=8, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _stablelm():
    config = transformers.StableLmConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=0.5,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.StableLmForCausalLM(config)


MODELS = {"multihead": _MultiheadLM, "gpt2": _gpt2, "stablelm-partial-rotary": _stablelm}
IDS = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))


def _logits(model):
    out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().to(F64).eval()


def _optimisers(groups, **muon):
    """QuotientMuon on the symmetry groups, AdamW (a plain QuotientAdam) on the rest."""
    bundles = [g for g in groups if g.get("bundle") is not None]
    rest = [g for g in groups if g.get("bundle") is None]
    return [QuotientMuon(bundles, lr=1e-2, weight_decay=0.1, **muon), QuotientAdam(rest, lr=1e-2)]


def _train(model, optimisers, steps):
    losses = []
    for _ in range(steps):
        for opt in optimisers:
            opt.zero_grad()
        logits = _logits(model)[:, :-1].reshape(-1, VOCAB)
        loss = nn.functional.cross_entropy(logits, IDS[:, 1:].flatten())
        loss.backward()
        for opt in optimisers:
            opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qmuon_trains_models_with_product_groups(name):
    model = _model(name)
    groups = symmetries(model)
    products = [g for g in groups if type(g.get("bundle")).__name__ == "ProductBundle"]
    assert products  # the case QuotientMuon used to refuse
    losses = _train(model, _optimisers(groups), steps=15)
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("dress_every, equivariant", [(1, True), (None, False)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qmuon_on_products_is_gauge_equivariant(name, dress_every, equivariant):
    """A model and a copy moved along its heads' GL(r) (condition 10): after 15 steps the
    outputs agree to 1e-6; the control without re-dressing (Newton–Schulz then sees the
    gauge) does not."""
    models = [_model(name) for _ in range(2)]
    gauge_transform(models[1], symmetries(models[1]), torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(_logits(models[1]), _logits(models[0])) <= 1e-12
    for model in models:
        _train(model, _optimisers(symmetries(model), dress_every=dress_every), steps=15)
    with torch.no_grad():
        gap = relative_error(_logits(models[1]), _logits(models[0]))
    assert gap <= 1e-6 if equivariant else gap > 1e-3


def test_a_product_with_a_part_without_factors_is_refused():
    bundle = M.ProductBundle([M.HeadQK(2, 5, 2), M.ResidualRotation(4, (0,), shapes=((4, 3),))])
    params = [nn.Parameter(t) for t in bundle.random_point()]
    with pytest.raises(ValueError, match="qk: .*ResidualRotation does not provide factors"):
        QuotientMuon([{"params": params, "bundle": bundle, "name": "qk"}])


# ---- hyperparameter rules ---------------------------------------------------------------------


def _weight():
    return [nn.Parameter(torch.randn(3, 3))]


REFUSED = [
    (QuotientMuon, dict(momentum=1.0), r"Invalid momentum value: 1.0 \(expected 0 <= "),
    (QuotientMuon, dict(momentum=1.5), r"Invalid momentum value: 1.5 \(expected 0 <= "),
    (QuotientMuon, dict(eps=0.0), r"Invalid epsilon value: 0.0 \(expected epsilon value > 0\)"),
    (QuotientMuon, dict(nesterov="no"), r"Invalid nesterov: 'no' \(expected True or False\)"),
    (QuotientMuon, dict(maximize="yes"), r"Invalid maximize: 'yes' \(expected True or False\)"),
    (QuotientAdam, dict(maximize="yes"), r"Invalid maximize: 'yes' \(expected True or False\)"),
    (QuotientSGD, dict(momentum=0.9, nesterov="no"), r"Invalid nesterov: 'no'"),
    (QuotientSGD, dict(maximize=1), r"Invalid maximize: 1 \(expected True or False\)"),
]
ACCEPTED = [
    (QuotientMuon, dict(momentum=0.99, eps=1e-12, nesterov=False, maximize=True)),
    (QuotientAdam, dict(maximize=True)),
    (QuotientSGD, dict(momentum=0.9, nesterov=True, maximize=False)),
]


@pytest.mark.parametrize("cls, options, message", REFUSED)
def test_invalid_hyperparameters_are_refused(cls, options, message):
    with pytest.raises(ValueError, match="param group 0: " + message):
        cls(_weight(), **options)


@pytest.mark.parametrize("cls, options", ACCEPTED)
def test_control_valid_hyperparameters_are_accepted(cls, options):
    params = _weight()
    optimiser = cls(params, **options)
    params[0].grad = torch.ones_like(params[0])
    optimiser.step()


@pytest.mark.parametrize("cls, options, message", REFUSED)
def test_invalid_hyperparameters_set_later_are_refused_at_step(cls, options, message):
    """A scheduler (or a user) may change a group after construction: checked at each step,
    before anything is written."""
    params = _weight()
    optimiser = cls(params, momentum=0.9) if cls is not QuotientAdam else cls(params)
    optimiser.param_groups[0].update(options)
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match=message):
        optimiser.step()
    assert torch.equal(before, params[0]) and not optimiser.state[params[0]]
