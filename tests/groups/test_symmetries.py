"""symmetries(), gauge_transform() and verify() on our models and on torch's own layers."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import manifolds as M
import quotopt
from manifolds.testing import relative_error
from quotopt.groups.layouts import ProjectionHeads, Rows, feature_blocks
from quotopt.models import RelationalTransformer, Transformer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``conftest.one_thread``)."""


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
    joint = quotopt.symmetries(model, residual=True)  # O(d) and the heads together
    assert [g["name"] for g in joint] == ["joint"]
    assert quotopt.verify(model, joint, *inputs)["joint"] <= 1e-9


def test_relational_gauge_group_holds_only_embeddings():
    model, _ = _build("relational")
    # channels=False: O(d_gauge) as its own group (by default it is part of the joint group)
    (gauge,) = [g for g in model.symmetry_groups(channels=False) if g["name"] == "gauge"]
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


# ---- biases by role: nn.TransformerEncoder with PyTorch's default biases -------------------------
def _norm_first_encoder(seed):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _train_encoder(make_optimiser, steps=200):
    """Regression onto a teacher of the same architecture (learnable exactly)."""
    teacher, model = _norm_first_encoder(1).eval(), _norm_first_encoder(0).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, 16, generator=gen)
    with torch.no_grad():
        y = teacher(x)
    optimiser, key_biases = make_optimiser(model)
    start = [b.detach().clone() for b in key_biases]
    loss = None
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        assert all(torch.equal(b, s) for b, s in zip(key_biases, start)), "key bias moved"
    return loss.item(), {n: p.detach().norm().item() for n, p in model.named_parameters()}


def _key_biases(model):
    return [layer.self_attn.in_proj_bias[16:32] for layer in model.layers]


@functools.lru_cache(maxsize=1)
def _adamw_baseline():
    return _train_encoder(lambda m: (torch.optim.AdamW(m.parameters(), lr=3e-3), []))


@pytest.mark.parametrize("metric", M.METRICS)
def test_encoder_with_default_biases_trains_like_adamw(metric):
    """QuotientAdam within 2× of AdamW's loss after 200 steps, no tensor's norm above 10×
    AdamW's, and the key bias (softmax shift, not a coordinate of the heads) never moves."""

    def quotient(model):
        groups = quotopt.symmetries(model, metric=metric)
        assert {type(g["bundle"]).__name__ for g in groups if g.get("bundle")} == {
            "ProductBundle", "PositiveRescaling"}  # fmt: skip
        return quotopt.QuotientAdam(groups, lr=3e-3), _key_biases(model)

    base_loss, base_norms = _adamw_baseline()
    loss, norms = _train_encoder(quotient)
    assert loss <= 2 * base_loss, (loss, base_loss)
    assert all(norms[n] <= 10 * base_norms[n] + 1e-6 for n in norms), (norms, base_norms)


def test_multihead_attention_key_bias_is_not_a_coordinate():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).double()
    (heads, plain) = quotopt.symmetries(mha)
    layout, e = heads["layout"], 16
    labels = [torch.arange(p.numel(), dtype=torch.float64).view(p.shape) for p in heads["params"]]
    bias_entries = {int(v) for t in layout(labels)[:3] for v in t[:, -1:].reshape(-1)}
    assert bias_entries.isdisjoint(range(e, 2 * e)) and set(range(e)) <= bias_entries
    assert plain["name"] == "plain" and plain["params"] == [mha.out_proj.bias]


def test_separate_kdim_attention_is_detected_and_verified():
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, batch_first=True).double()
    groups, report = quotopt.symmetries(mha, report=True)
    assert [g["name"] for g in groups] == ["heads", "plain"]
    x, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 10)
    changes = quotopt.verify(mha, groups, x.double(), k.double(), v.double())
    assert changes["heads"] <= 1e-12 and all(f.change <= 1e-12 for f in report.groups)


# ---- verify ------------------------------------------------------------------------------------
class _TupleOut(nn.Module):
    """nanoGPT-like: a fused c_attn with biases (zero-initialised), returns (logits, None)."""

    def __init__(self, d=16, h=4):
        super().__init__()
        self.h, self.c_attn, self.c_proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)
        nn.init.zeros_(self.c_attn.bias)

    def forward(self, x, *, scale=1.0):
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.c_attn(x).split(d, -1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return {"out": (self.drop(self.c_proj(y.transpose(1, 2).reshape(B, T, d))) * scale, None)}


def _qk_without_bias(model, d=16, h=4):
    """A wrong declaration: GL(r) on the q/k rows of c_attn.weight, the bias left out."""
    specs = [Rows(0, feature_blocks(0, h, 1, d // h)), Rows(0, feature_blocks(d, h, 1, d // h))]
    return {"params": [model.c_attn.weight], "bundle": M.HeadQK(h, d, d // h),
            "layout": ProjectionHeads(specs), "name": "qk"}  # fmt: skip


def test_verify_randomises_what_a_declaration_forgot():
    model = _TupleOut().double()
    groups = quotopt.symmetries(model, declared=[_qk_without_bias(model)], example_inputs=None)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    blind = quotopt.verify(
        model, groups, x, randomize=False, generator=torch.Generator().manual_seed(0)
    )
    assert blind["qk"] <= 1e-12  # the zero bias hides the mistake ...
    seen = quotopt.verify(model, groups, x, generator=torch.Generator().manual_seed(0))
    assert seen["qk"] > 1e-3  # ... randomised, it does not
    assert "c_attn.bias" in seen.randomised and seen.compared == ["output.out[0] (2, 5, 16)"]


def test_verify_in_train_mode_equals_eval_mode_and_forwards_kwargs():
    model = _TupleOut().double().train()
    with torch.no_grad():
        model.c_attn.bias.normal_()
    h, r = 4, 4
    specs = [Rows(0, feature_blocks(0, h, 1, r), bias=1), Rows(0, feature_blocks(16, h, 1, r))]
    qk = {"params": [model.c_attn.weight, model.c_attn.bias],
          "bundle": M.HeadQK(h, 17, r, factor_rows=(17, 16)),
          "layout": ProjectionHeads(specs), "name": "qk"}  # fmt: skip
    groups = quotopt.symmetries(model, declared=[qk])
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    train = quotopt.verify(model, groups, x, scale=2.0, generator=torch.Generator().manual_seed(0))
    assert model.training
    evald = quotopt.verify(
        model.eval(), groups, x, scale=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert train == evald and train["qk"] <= 1e-12 and train.mode == "eval"


# ---- declarations and the report ---------------------------------------------------------------
def _fused_declarations(model, d=16, h=4):
    r = d // h
    qk = {
        "params": [model.c_attn.weight, model.c_attn.bias],
        "bundle": M.HeadQK(h, d + 1, r, factor_rows=(d + 1, d)),
        "layout": ProjectionHeads(
            [Rows(0, feature_blocks(0, h, 1, r), bias=1), Rows(0, feature_blocks(d, h, 1, r))]
        ),
        "name": "qk",
    }
    ov = {"params": [model.c_attn.weight, model.c_attn.bias, model.c_proj.weight],
          "bundle": M.HeadOV(h, d + 1, r, factor_rows=(d + 1, d)),
          "layout": ProjectionHeads([Rows(0, feature_blocks(2 * d, h, 1, r), bias=1),
                                     Rows(2, feature_blocks(0, h, 1, r), transposed=True,
                                          writes=True)]), "name": "ov"}  # fmt: skip
    return qk, ov


def test_two_declared_bundles_on_one_fused_tensor_compose():
    model = _TupleOut().double()
    groups = quotopt.symmetries(model, declared=_fused_declarations(model))
    (heads,) = [g for g in groups if g.get("bundle") is not None]
    assert type(heads["bundle"]).__name__ == "ProductBundle" and heads["members"] == ["qk", "ov"]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert quotopt.verify(model, groups, x)["qk"] <= 1e-12
    opt = quotopt.QuotientAdam(groups, lr=1e-3)
    model(x)["out"][0].square().mean().backward()
    opt.step()  # the composed layout writes back


def test_declared_bundles_on_the_same_entries_are_refused_with_the_fix():
    model = _TupleOut().double()
    qk, _ = _fused_declarations(model)
    with pytest.raises(ValueError, match="overlaps another .qk. on the same entries of c_attn"):
        quotopt.symmetries(model, declared=[qk, dict(qk, name="again")])


def test_a_declared_module_is_never_detected():
    """MultiheadAttention with add_bias_kv has no detected layout: reported, not raised; its
    declared groups are taken as they are."""
    mha = nn.MultiheadAttention(16, 4, add_bias_kv=True).double()
    with pytest.warns(UserWarning, match="found no symmetry"):
        _, report = quotopt.symmetries(mha, report=True)
    assert "add_bias_kv" in str(report)
    fake = {"params": [mha.out_proj.weight], "bundle": M.ResidualRotation(16, [0]), "name": "mine"}
    groups = quotopt.symmetries(mha, declared=[fake])
    assert [g["name"] for g in groups] == ["mine", "plain"]


def test_report_table_and_warning_when_nothing_is_found():
    model, _ = _build("encoder")
    report = quotopt.describe(model)
    text = str(report)
    assert "layers.0.self_attn" in text and "HeadQK x HeadOV" in text and 0 < report.share < 1
    gelu = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="Declare the bundles"):
        groups = quotopt.symmetries(gelu)
    assert [g["name"] for g in groups] == ["plain"]


class _NanoBlock(nn.Module):
    """nanoGPT's CausalSelfAttention with biases: fused ``c_attn`` (nn.Linear), ``c_proj``."""

    def __init__(self, d=16, n_head=4):
        super().__init__()
        self.n_head, self.n_embd = n_head, d
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.c_proj(y.transpose(1, 2).reshape(B, T, d))


def test_nanogpt_attention_with_biases_is_found_and_trains_with_redressing():
    """Detected by structure once example inputs are given (the key bias is not a coordinate),
    and QuotientAdam with the invariant metric re-dresses every 5 steps without a LinAlgError."""
    torch.manual_seed(0)
    model = nn.Sequential(_NanoBlock(), _NanoBlock())
    x = torch.randn(8, 6, 16)
    assert all(g.get("bundle") is None for g in _quiet(quotopt.symmetries, model))  # unverified
    groups = quotopt.symmetries(model, metric="invariant", example_inputs=((x,), {}))
    assert [g["name"] for g in groups] == ["0.heads", "1.heads", "plain"]
    key = [block.c_attn.bias[16:32].detach().clone() for block in model]
    optimiser = quotopt.QuotientAdam(groups, lr=1e-3, dress_every=5)
    y = torch.randn(8, 6, 16)
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert all(torch.equal(b.c_attn.bias[16:32], k) for b, k in zip(model, key))


def _quiet(fn, *args, **kwargs):
    with pytest.warns(UserWarning, match="found no symmetry"):
        return fn(*args, **kwargs)


class _Expert(nn.Module):
    def __init__(self, d=8, m=16):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, m, bias=False), nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _MoE(nn.Module):
    """Experts as a ModuleList; the example routes no token to the last expert."""

    def __init__(self):
        super().__init__()
        self.experts, self.router = nn.ModuleList(_Expert() for _ in range(3)), nn.Linear(8, 3)

    def forward(self, x):
        w = self.router(x).softmax(-1)
        return sum(w[..., i : i + 1] * e(x) for i, e in enumerate(self.experts[:2]))


def test_mixture_of_experts_units_including_an_expert_no_token_reached():
    model = _MoE().double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    groups, report = quotopt.symmetries(model, example_inputs=((x,), {}), report=True)
    assert [g["name"] for g in groups] == [f"experts.{i}.units" for i in range(3)] + ["plain"]
    assert all(f.change <= 1e-12 for f in report.groups)
    assert max(quotopt.verify(model, groups, x).values()) <= 1e-12


def test_a_failing_example_forward_is_reported_not_raised():
    model = nn.Sequential(_NanoBlock())
    with pytest.warns(UserWarning, match="found no symmetry"):
        _, report = quotopt.symmetries(
            model, example_inputs=((torch.randn(2, 3, 5),), {}), report=True
        )
    assert "the example forward failed (RuntimeError" in str(report)


def test_report_names_unrecognised_modules_and_layernorm():
    class OddAttention(nn.Module):  # no projection under a known role name
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

        def forward(self, x):
            return self.mix(x)

    model = nn.Sequential(OddAttention(), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="OddAttention"):
        text = str(quotopt.describe(model))
    assert "unrecognised layout (OddAttention): declare it" in text
    assert "O(d) not reduced: LayerNorm centring breaks it" in text


def test_detection_restores_every_module_mode():
    torch.manual_seed(0)
    model = nn.Sequential(_NanoBlock(), _NanoBlock()).train()
    model[1].eval()
    x = torch.randn(2, 5, 16)
    groups = quotopt.symmetries(model, example_inputs=((x,), {}))
    assert [g["name"] for g in groups] == ["0.heads", "1.heads", "plain"]
    assert model.training and model[0].training and not model[1].training


# ---- layouts: one write-back --------------------------------------------------------------------
def test_copy_into_skips_aliases_that_copy_refuses():
    """The Qwen1.5 crash: a coordinate that is a view of the parameter with another stride on a
    size-1 axis made ``copy_`` refuse the overlap; ``copy_into`` sees it is the same entries."""
    from quotopt.groups.layouts import copy_into

    weight = torch.randn(6, 4)
    view = weight.view(2, 3, 1, 4).permute(0, 1, 3, 2)  # (2, 3, 4, 1)
    same = view.reshape(2, 3, 4).view(2, 3, 4, 1)  # same entries, another size-1 stride
    assert view.stride() != same.stride()
    with pytest.raises(RuntimeError, match="single memory location"):
        view.copy_(same)  # the control: torch refuses
    copy_into(view, same)
    shifted = weight[1:].clone()
    copy_into(weight[:-1], weight[1:])  # a true partial overlap is cloned first
    assert torch.equal(weight[:-1], shifted)


@pytest.mark.parametrize("bias", [True, False])
def test_projection_heads_write_back_round_trip(bias):
    """gather ∘ write_back is the identity on the selected entries and leaves the others (the
    key bias inside a fused bias) alone; view coordinates need no copy."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias).double()
    (heads, *_) = quotopt.symmetries(mha)
    layout, params = heads["layout"], heads["params"]
    saved = [p.detach().clone() for p in params]
    new = tuple(torch.randn_like(t) for t in layout(params))
    layout.write_back(params, new)
    assert all(torch.equal(a, b) for a, b in zip(layout(params), new))
    if bias:
        assert torch.equal(params[1][16:32], saved[1][16:32])  # the key bias did not move
    assert layout.needs_scatter == bias
