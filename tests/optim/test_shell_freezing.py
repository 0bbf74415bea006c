"""Freezing in the optimiser shell: frozen groups stay bit-identical whatever a scheduler sets
(the key biases softmax ignores), and a bundle group frozen in part after the optimiser is
built is refused at step time, changing nothing — each beside a control that moves."""

from __future__ import annotations

import pytest
import torch

import manifolds as M
from quotopt import QuotientAdam, QuotientMuon, QuotientSGD, symmetries
from quotopt.models import Transformer

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``conftest.one_thread``)."""


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=8,
    )  # fmt: skip
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _key_biases(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("key.bias")}


def _make(kind, groups):
    """The optimiser under test on the model's groups (QuotientMuon takes the bundle groups and
    the frozen ones; the plain group goes to a QuotientAdam beside it)."""
    if kind == "qadam":
        return [QuotientAdam(groups, lr=1e-2)]
    if kind == "qsgd":
        return [QuotientSGD(groups, lr=1e-2, momentum=0.9)]
    muon = [g for g in groups if g.get("bundle") is not None or g.get("frozen")]
    rest = [g for g in groups if g.get("bundle") is None and not g.get("frozen")]
    return [QuotientMuon(muon, lr=1e-2), QuotientAdam(rest, lr=1e-2)]


def _train_one_cycle(model, optimisers, steps=6):
    """``steps`` steps of a regression on the hidden states under OneCycleLR (which sets
    every group's lr, the frozen ones' included)."""
    ids = torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(1))
    target = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    first = optimisers[0]
    schedule = torch.optim.lr_scheduler.OneCycleLR(first, max_lr=1e-2, total_steps=steps + 1)
    for _ in range(steps):
        for opt in optimisers:
            opt.zero_grad()
        ((model(ids).last_hidden_state - target) ** 2).mean().backward()
        for opt in optimisers:
            opt.step()
        schedule.step()
    assert all(g["lr"] > 0 for g in first.param_groups)  # the schedule reached every group


@pytest.mark.parametrize("kind", ["qadam", "qsgd", "qmuon"])
def test_key_biases_are_bit_identical_after_a_one_cycle_schedule(kind):
    model = _bert()
    groups = symmetries(model)
    keys = _key_biases(model)
    ids = {id(p) for p in keys.values()}
    assert keys and all(g.get("frozen") for g in groups if id(g["params"][0]) in ids)
    before = {n: p.detach().clone() for n, p in keys.items()}
    moving = {n: p.detach().clone() for n, p in model.named_parameters() if "query" in n}
    _train_one_cycle(model, _make(kind, groups))
    assert all(torch.equal(before[n], p) for n, p in keys.items())
    named = dict(model.named_parameters())
    assert all(not torch.equal(moving[n], named[n]) for n in moving)  # the rest trained


@pytest.mark.parametrize("mechanism", ["lr 0 alone", "AdamW"])
def test_control_key_biases_move_without_the_frozen_flag(mechanism):
    """The same schedule moves them under lr 0 alone (Adam normalises their round-off
    gradient into steps of size lr) and under AdamW."""
    model = _bert()
    keys = _key_biases(model)
    before = {n: p.detach().clone() for n, p in keys.items()}
    if mechanism == "AdamW":
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        groups = [{k: v for k, v in g.items() if k != "frozen"} for g in symmetries(model)]
        optimiser = QuotientAdam(groups, lr=1e-2)
    _train_one_cycle(model, [optimiser])
    assert all(not torch.equal(before[n], p) for n, p in keys.items())


def test_frozen_is_kept_through_state_dict_and_validated():
    model = _bert()
    optimiser = QuotientAdam(symmetries(model), lr=1e-2)
    _train_one_cycle(model, [optimiser], steps=2)
    saved = optimiser.state_dict()
    for group in saved["param_groups"]:
        group.pop("frozen", None)  # a state saved without the flag cannot unfreeze a group
    twin = QuotientAdam(symmetries(model), lr=1e-2)
    twin.load_state_dict(saved)
    assert [g.get("frozen") for g in twin.param_groups] == [
        g.get("frozen") for g in optimiser.param_groups
    ]
    assert any(g.get("frozen") for g in twin.param_groups)
    weight = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"key: Invalid frozen: 'yes' \(expected True or False\)"):
        QuotientAdam([{"params": [weight], "name": "key", "frozen": "yes"}])


# ---- a bundle group frozen in part after construction -------------------------------------------


def _snapshot(optimiser, params):
    state = {
        id(p): {k: (tuple(map(torch.clone, v)) if isinstance(v, tuple) else v.clone())
                for k, v in optimiser.state[p].items()}
        for p in params if optimiser.state[p]
    }  # fmt: skip
    return [p.detach().clone() for p in params], state


def _unchanged(snapshot, optimiser, params) -> bool:
    values, state = snapshot
    same = all(torch.equal(a, b) for a, b in zip(values, params))
    for p in params:
        for key, value in state.get(id(p), {}).items():
            now = optimiser.state[p][key]
            pairs = zip(value, now) if isinstance(value, tuple) else [(value, now)]
            same &= all(torch.equal(a, b) for a, b in pairs)
    return same and {id(p) for p in params if optimiser.state[p]} == set(state)


def _tiny_transformer():
    torch.manual_seed(0)
    return Transformer(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_len=6)


def _lm_step(model, optimiser):
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    optimiser.zero_grad()
    logits = model(tokens)[:, :-1].reshape(-1, 11)
    torch.nn.functional.cross_entropy(logits, tokens[:, 1:].flatten()).backward()
    optimiser.step()


@pytest.mark.parametrize("freeze", [True, False])
def test_freezing_part_of_the_residual_group_later_is_refused(freeze):
    """``residual=True``: one O(d) group holds every tensor. Freezing the embedding after the
    optimiser is built is refused at the next step, naming group, parameter and fix, and
    changes nothing; the control (nothing frozen) steps every parameter."""
    model = _tiny_transformer()
    groups = symmetries(model, residual=True)
    optimiser = QuotientAdam(groups, lr=1e-2)
    params = list(model.parameters())
    _lm_step(model, optimiser)
    snapshot = _snapshot(optimiser, params)
    if freeze:
        frozen = params[0]  # the token embedding
        frozen.requires_grad_(False)
        index = next(i for i, p in enumerate(groups[0]["params"]) if p is frozen)
        shape = tuple(frozen.shape)
        pattern = rf"{groups[0]['name']}: params\[{index}\] \({shape[0]}, {shape[1]}\) "
        with pytest.raises(ValueError, match=pattern + r"requires_grad=False since.*Freeze"):
            _lm_step(model, optimiser)
        assert _unchanged(snapshot, optimiser, params)
    else:
        _lm_step(model, optimiser)
        assert all(not torch.equal(a, b) for a, b in zip(snapshot[0], params))


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD, QuotientMuon])
def test_freezing_one_stacked_adapter_later_is_refused(cls):
    """Adapters of one shape stacked as the heads of one group (what ``peft`` models give):
    freezing one of them is refused at step time, naming it; freezing all is a no-op."""
    bundle = M.HeadOV(2, 6, 2)
    params = [torch.nn.Parameter(t) for t in bundle.random_point()]
    optimiser = cls([{"params": params, "bundle": bundle, "name": "lora.stack"}], lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    optimiser.step()
    snapshot = _snapshot(optimiser, params)
    params[1].requires_grad_(False)
    with pytest.raises(ValueError, match=r"lora.stack: params\[1\] \(2, 2, 6\) requires_grad"):
        optimiser.step()
    assert _unchanged(snapshot, optimiser, params)
    params[0].requires_grad_(False)
    optimiser.step()  # the whole group frozen: never changed
    assert _unchanged(snapshot, optimiser, params)
