"""symmetries(), gauge_transform() and verify() on our models and on torch's own layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manifolds as M
import quotopt
from manifolds.testing import relative_error
from quotopt.models import RelationalTransformer, Transformer


def _encoder(bias=True, activation="relu"):
    layer = nn.TransformerEncoderLayer(
        16, 4, 32, dropout=0.0, batch_first=True, bias=bias, activation=activation
    )
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _decoder():
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerDecoder(layer, 1).eval()


CASES = {
    "transformer": (
        lambda: Transformer(23, 16, 2, 4, 16),
        lambda: (torch.randint(0, 23, (3, 11)),),
    ),
    "transformer-relu": (
        lambda: Transformer(23, 16, 2, 4, 16, activation="relu"),
        lambda: (torch.randint(0, 23, (3, 11)),),
    ),
    "relational": (
        lambda: RelationalTransformer(23, 6, 4, 2, 2, 16),
        lambda: (torch.randint(0, 23, (3, 11)),),
    ),
    "encoder": (_encoder, lambda: (torch.randn(3, 7, 16),)),
    "encoder-nobias-gelu": (lambda: _encoder(False, "gelu"), lambda: (torch.randn(3, 7, 16),)),
    "decoder": (_decoder, lambda: (torch.randn(3, 7, 16), torch.randn(3, 5, 16))),
}


def _build(case):
    make_model, make_inputs = CASES[case]
    torch.manual_seed(0)
    model = make_model().double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in make_inputs())
    return model, inputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_gauge_transform_is_an_exact_symmetry(case):
    """Outputs unchanged to 1e-9 relative (float64) while the parameters moved ≥ 1e-2."""
    model, inputs = _build(case)
    groups = quotopt.symmetries(model)
    assert any(g.get("bundle") is not None for g in groups)
    with torch.no_grad():
        before = model(*inputs)
        params_before = [p.detach().clone() for p in model.parameters()]
    quotopt.gauge_transform(model, groups, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after = model(*inputs)
    moved = relative_error(tuple(model.parameters()), tuple(params_before))
    assert moved >= 1e-2
    assert relative_error(after, before) <= 1e-9


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_agrees_and_leaves_the_model_alone(case):
    model, inputs = _build(case)
    groups = quotopt.symmetries(model)
    snapshot = [p.detach().clone() for p in model.parameters()]
    changes = quotopt.verify(model, groups, *inputs, generator=torch.Generator().manual_seed(2))
    assert set(changes) == {g["name"] for g in groups if g.get("bundle") is not None}
    assert max(changes.values()) <= 1e-9
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))


def test_verify_detects_a_false_symmetry():
    """Declaring O(d) on a LayerNorm model's embeddings is caught: the output changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    wrong = M.ResidualRotation(8, (0, 0), shapes=((8, 6), (8,)))
    declared = [{"params": [model[0].weight, model[0].bias], "bundle": wrong, "name": "fake"}]
    groups = quotopt.symmetries(model, declared=declared)
    changes = quotopt.verify(model, groups, torch.randn(5, 6, dtype=torch.float64))
    assert changes["fake"] > 1e-3


def test_groups_cover_every_parameter_exactly_once():
    """A model mixing our blocks with plain layers: every parameter in exactly one group."""
    torch.manual_seed(0)
    inner = Transformer(11, 8, 1, 2, 8, activation="relu")
    model = nn.ModuleDict({"lm": inner, "probe": nn.Linear(8, 3), "norm": nn.LayerNorm(8)})
    groups = quotopt.symmetries(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert [g["name"] for g in groups][-1] == "plain"


def test_uncovered_and_doubly_covered_parameters_are_named():
    model = Transformer(11, 8, 1, 2, 8)
    with pytest.raises(ValueError, match="not covered by any symmetry group: tok_emb, pos_emb"):
        quotopt.symmetries(model, plain=False)
    attn = model.blocks[0].attn
    twice = [
        {"params": [attn.wq, attn.wk], "bundle": M.HeadQK(2, 8, 4), "name": "mine"},
        {"params": [attn.wq, attn.wk], "bundle": M.HeadQK(2, 8, 4), "name": "again"},
    ]
    with pytest.raises(ValueError, match="declared group again overlaps another"):
        quotopt.symmetries(model, declared=twice)


def test_declared_groups_take_precedence_over_detection():
    model = Transformer(11, 8, 1, 2, 8)
    attn = model.blocks[0].attn
    mine = [
        {"params": [attn.wq, attn.wk], "bundle": M.HeadQK(2, 8, 4, "invariant"), "name": "mine"}
    ]
    groups = quotopt.symmetries(model, declared=mine)
    names = [g["name"] for g in groups]
    assert "mine" in names and "blocks.0.attn.qk" not in names and "blocks.0.attn.ov" in names


def test_residual_rotation_of_the_whole_transformer():
    model, inputs = _build("transformer")
    groups = quotopt.symmetries(model, heads=False, residual=True)
    assert [g["name"] for g in groups] == ["residual"]
    assert quotopt.verify(model, groups, *inputs)["residual"] <= 1e-9
    with pytest.raises(ValueError, match="act jointly"):
        quotopt.symmetries(model, residual=True)


def test_relational_gauge_group_holds_only_embeddings():
    model, _ = _build("relational")
    (gauge,) = [g for g in quotopt.symmetries(model) if g["name"] == "gauge"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("emb" in names[id(p)] for p in gauge["params"])


@pytest.mark.parametrize("case", ["transformer", "relational"])
def test_quotient_adam_trains_both_models(case):
    """QuotientAdam(symmetries(model)) on a small copy task: the loss falls clearly."""
    torch.manual_seed(0)
    model = CASES[case][0]()
    optimiser = quotopt.QuotientAdam(quotopt.symmetries(model), lr=1e-2)
    data = torch.randint(0, 23, (64, 8))
    tokens = torch.cat([data, data], dim=1)  # second half repeats the first
    losses = []
    for step in range(100):
        batch = tokens[(step * 16) % 64 : (step * 16) % 64 + 16]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 23), batch[:, 9:].reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
