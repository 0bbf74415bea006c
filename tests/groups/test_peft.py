"""LoRA adapters on the quotient: ``peft`` models and quotopt's own ``LoRALinear``.

One GL(r) bundle per adapter pair (B g, g⁻¹ A), pairs of one shape stacked as the heads of one
``HeadOV`` group. The ``peft`` tests skip without ``peft`` (extra ``lora``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import manifolds as M
import quotopt
from manifolds.testing import relative_error
from quotopt.groups import LoRALinear, LoRARankWarning, add_lora, group_point, write_point

F64 = torch.float64
# peft 0.21 reads a property that transformers 5 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``conftest.one_thread``)."""


@pytest.fixture(scope="module")
def peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


def _llama(dtype=F64):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _lora_model(peft, targets=("q_proj", "v_proj"), r=4, dtype=F64):
    config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0)
    return peft.get_peft_model(_llama(dtype), config)


def _lora_groups(groups):
    return [g for g in groups if g["name"].startswith("lora.")]


IDS = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))


def test_peft_groups_on_the_requested_targets(peft):
    """q_proj (32 → 32) and v_proj (32 → 16, GQA) adapters: two shapes, one group each, one head
    per layer; nothing of the frozen base model is in a group."""
    model = _lora_model(peft)
    groups, report = quotopt.symmetries(model, report=True)
    lora = _lora_groups(groups)
    assert sorted(g["name"] for g in lora) == ["lora.16x4x32", "lora.32x4x32"], str(report)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in lora:
        assert group["bundle"].n_heads == 2 and group["bundle"].group_dim == 2 * 16
        members = [names[id(p)] for p in group["params"]]
        target = "q_proj" if group["name"] == "lora.32x4x32" else "v_proj"
        assert all(target in n and ("lora_A" in n or "lora_B" in n) for n in members)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert all(g.get("bundle") is not None for g in groups)  # no plain group is needed


def test_peft_groups_verify_after_the_adapters_leave_zero(peft):
    model = _lora_model(peft)
    groups = quotopt.symmetries(model)
    changes = quotopt.verify(model, groups, IDS, use_cache=False, generator=torch.Generator())
    assert max(changes.values()) <= 1e-9 and any("lora_B" in n for n in changes.randomised)


@pytest.mark.parametrize("metric", M.METRICS)
def test_quotient_adam_steps_from_b_zero(peft, metric):
    """B = 0 is rank-deficient: QuotientAdam steps from it (the invariant metric damped), the
    loss falls and merge_and_unload gives the same function."""
    model = _lora_model(peft, dtype=torch.float32)
    groups = quotopt.symmetries(model, metric=metric, lora_damping=1e-3)
    optimiser = quotopt.QuotientAdam(groups, lr=1e-2)
    losses = _train(model, optimiser, 15)
    assert losses[-1] < losses[0]
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().max() > 0
    with torch.no_grad():
        before = model(IDS, use_cache=False).logits
        merged = model.merge_and_unload()
        after = merged(IDS, use_cache=False).logits
    assert relative_error(after, before) < 1e-5


def test_the_undamped_invariant_metric_steps_from_b_zero(peft):
    """With the defaults (no damping) B = 0 is a valid start: the zero Gram of B gets the zero
    pseudo-inverse (A's update needs only AAᵀ's inverse, B's gradient is B-independent), the
    adapters leave zero and the loss falls."""
    model = _lora_model(peft, dtype=torch.float32)
    optimiser = quotopt.QuotientAdam(quotopt.symmetries(model, metric="invariant"), lr=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        losses = _train(model, optimiser, 15)
    assert losses[-1] < losses[0]
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().max() > 0


def test_an_adapter_rank_above_its_dimensions_is_left_plain(peft):
    """r = 20 > 16 = d_out of v_proj: no GL(20) bundle exists there; the v adapters are left to
    the plain group with a warning naming module, rank and fix, the q adapters keep theirs."""
    model = _lora_model(peft, r=20)
    with pytest.warns(LoRARankWarning, match=r"self_attn\.v_proj\.lora\.default: .*r=20 > .*=16"):
        groups = quotopt.symmetries(model)
    assert sorted(g["name"] for g in _lora_groups(groups)) == ["lora.32x20x32"]
    (plain,) = [g for g in groups if g["name"] == "plain"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("v_proj" in names[id(p)] for p in plain["params"]) and len(plain["params"]) == 4
    optimiser = quotopt.QuotientAdam(groups, lr=1e-2)
    model(IDS, labels=IDS, use_cache=False).loss.backward()
    optimiser.step()


def test_a_factor_with_fewer_rows_than_the_rank_is_refused():
    with pytest.raises(ValueError, match="factor Wo has 16 rows, fewer than d_head=20"):
        M.HeadOV(1, 32, 20, factor_rows=(32, 16))


def _train(model, optimiser, steps: int) -> list[float]:
    """``steps`` steps of the language-model loss on ``IDS``; the losses before each step."""
    losses = []
    for _ in range(steps):
        loss = model(IDS, labels=IDS, use_cache=False).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("name", "make", "equivariant"),
    [
        ("quotient-adam", lambda g: quotopt.QuotientAdam(g, lr=1e-2, dress_every=None), True),
        ("adamw", lambda g: torch.optim.AdamW([p for x in g for p in x["params"]], lr=1e-2), False),
    ],
)
def test_lora_training_is_gauge_equivariant_at_full_rank(peft, name, make, equivariant):
    """From a full-rank adapter p and from p·g (invariant metric, zero damping), 150 steps land
    on the same orbit: the products B A agree to 1e-6 (float64). AdamW (the control) does not."""
    model = _lora_model(peft)
    gen = torch.Generator().manual_seed(4)
    groups = quotopt.symmetries(model, metric="invariant")
    with torch.no_grad():
        for group in _lora_groups(groups):
            b, a = group_point(group)
            write_point(group, (torch.randn(b.shape, generator=gen, dtype=F64) * 0.1, a))
    twin = copy.deepcopy(model)
    twin_groups = quotopt.symmetries(twin, metric="invariant")
    quotopt.gauge_transform(twin, _lora_groups(twin_groups), generator=gen, condition=3.0)
    _train(model, make(groups), 150)
    _train(twin, make(twin_groups), 150)
    products = [g["bundle"].invariants(group_point(g)) for g in _lora_groups(groups)]
    twins = [g["bundle"].invariants(group_point(g)) for g in _lora_groups(twin_groups)]
    gap = max(relative_error(a, b) for a, b in zip(products, twins))
    assert (gap <= 1e-6) if equivariant else (gap > 1e-4), gap


def test_several_peft_adapters_are_all_grouped(peft):
    model = _lora_model(peft, targets=("q_proj",))
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    for module in model.modules():  # train both adapters
        for key in ("lora_A", "lora_B"):
            for layer in getattr(module, key, {}).values() if hasattr(module, key) else ():
                layer.requires_grad_(True)
    groups = quotopt.symmetries(model)
    assert sorted(g["name"] for g in _lora_groups(groups)) == ["lora.32x2x32", "lora.32x4x32"]


def test_own_lora_wrapper_on_plain_linear_layers():
    """Without peft: ``add_lora`` wraps the named nn.Linear layers; the pairs are found,
    verified, trained from B = 0, and ``merged()`` is the same map."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    model = add_lora(nn.ModuleDict({"up": model[0], "act": model[1], "down": model[2]}),
                     targets=("up", "down"), r=2)  # fmt: skip
    run = lambda x: model["down"](model["act"](model["up"](x)))  # noqa: E731

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return run(x)

    wrapped = Wrapped()
    groups = quotopt.symmetries(wrapped)
    assert [g["name"] for g in groups] == ["lora.16x2x8", "lora.8x2x16"]
    x = torch.randn(5, 8, dtype=F64)
    assert max(quotopt.verify(wrapped, groups, x).values()) <= 1e-12
    optimiser = quotopt.QuotientAdam(groups, lr=1e-2, dress_every=None)
    y = torch.randn(5, 8, dtype=F64)
    first = None
    for _ in range(20):
        loss = (wrapped(x) - y).square().mean()
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < first
    up = model["up"]
    assert isinstance(up, LoRALinear) and up.lora_B.abs().max() > 0
    assert relative_error(up.merged()(x), up(x)) < 1e-12
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), targets=("q_proj",))
