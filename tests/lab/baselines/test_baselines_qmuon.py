"""The QuotientMuon baseline on models as users bring them: fused projections go to
QuotientMuon, and the frozen key biases stay frozen."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quotopt.lab.baselines.muon import quotient_muon_adamw  # noqa: E402


def _groups(optimiser):
    return [(kind, g) for kind, o in optimiser.optimizers.items() for g in o.param_groups]


def test_fused_qkv_groups_go_to_quotient_muon():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=31,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    optimiser = quotient_muon_adamw(transformers.GPT2Model(cfg), 1e-2, 0.0)
    names = [g.get("name") for kind, g in _groups(optimiser) if kind == "qmuon"]
    assert names == ["h.0.attn.heads", "h.1.attn.heads"]


def test_key_biases_stay_frozen_under_the_baseline():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=31,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(cfg)
    optimiser = quotient_muon_adamw(model, 1e-2, 0.0)
    key_bias = model.encoder.layer[0].attention.self.key.bias
    frozen = [g for _, g in _groups(optimiser) if g.get("frozen")]
    assert [p is key_bias for g in frozen for p in g["params"]] == [True]
    before = key_bias.detach().clone()
    ids = torch.randint(0, 31, (2, 8))
    for _ in range(3):
        optimiser.zero_grad()
        model(ids).last_hidden_state.square().mean().backward()
        optimiser.step()
    assert torch.equal(key_bias, before)
    # control: the query bias beside it is trained
    query_bias = model.encoder.layer[0].attention.self.query.bias
    assert not torch.equal(query_bias, torch.zeros_like(query_bias))
