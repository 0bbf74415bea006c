"""Hugging Face models off the name lists: inputs beyond token ids, layouts read by structure, the
report's rows and reasons (``quotopt.groups.detectors``: ``hf``, ``hf_inputs``, ``mlp``).

Tiny configs with random weights, built offline; every positive claim sits beside a control that
fails (a wrong structural reading, a non-homogeneous activation, a forward that does not run).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manifolds as M
import quotopt
from quotopt.groups import example_inputs
from quotopt.groups.detectors.mlp import homogeneity_degree

F64 = torch.float64
VOCAB = 50
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)  # fmt: skip
VISION = dict(TOWER, image_size=8, patch_size=4)
AUDIO = dict(TOWER, conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3),
             num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)  # fmt: skip
SMALL = dict(TOWER, vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``conftest.one_thread``)."""


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


#: name: (config class, model class, config, {bundle type: number of groups})
MODELS = {
    "clip": ("CLIPConfig", "CLIPModel",
             dict(text_config=TEXT, vision_config=VISION, projection_dim=16),
             {"HeadQK": 4, "HeadOV": 4}),
    "siglip": ("SiglipConfig", "SiglipModel", dict(text_config=TEXT, vision_config=VISION),
               {"HeadQK": 4, "HeadOV": 4, "HeadQK x HeadOV": 1}),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", AUDIO, {"HeadQK": 2, "HeadOV": 2}),
    "hubert": ("HubertConfig", "HubertModel", AUDIO, {"HeadQK": 2, "HeadOV": 2}),
    "modernbert": ("ModernBertConfig", "ModernBertModel",
                   dict(SMALL, cls_token_id=0, sep_token_id=0),
                   {"RotaryQK x HeadOV": 2, "PositiveRescaling": 2}),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", SMALL, {"HeadQK": 2, "HeadOV": 2}),
    "deberta-v2-relu": ("DebertaV2Config", "DebertaV2Model", dict(SMALL, hidden_act="relu"),
                        {"HeadQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
}  # fmt: skip


def _model(transformers, name, dtype=F64):
    config_cls, model_cls, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, model_cls)(config).to(dtype).eval()


def _counts(groups) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in groups:
        if group.get("bundle") is not None:
            parts = getattr(group["bundle"], "components", None) or [group["bundle"]]
            key = " x ".join(type(c).__name__ for c in parts)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("name", sorted(MODELS))
def test_groups_found_and_verified_with_default_arguments(transformers, name):
    """Dual encoders get ids and pixels, audio models a waveform long enough for their feature
    encoder; ModernBERT (``Wqkv``/``Wo``, ``Wi``/``Wo``) and DeBERTa-v2 (``query_proj`` …,
    ``output.dense``) are read by structure. No warning (pytest turns
    one into an error); verify ≤ 1e-9 on the float64 model with touched modules randomised."""
    model = _model(transformers, name)
    groups, report = quotopt.symmetries(model, report=True)
    assert _counts(groups) == MODELS[name][3], str(report)
    args, kwargs = example_inputs(model)
    changes = quotopt.verify(model, groups, *args, generator=torch.Generator().manual_seed(1),
                             **kwargs)  # fmt: skip
    assert max(changes.values()) <= 1e-9, changes


def test_example_inputs_by_modality(transformers):
    clip = _model(transformers, "clip", torch.float32)
    _, kwargs = example_inputs(clip)
    assert kwargs["input_ids"].shape == (2, 8) and kwargs["pixel_values"].shape == (2, 3, 8, 8)
    _, kwargs = example_inputs(clip.text_model)  # one tower: its own input only
    assert set(kwargs) - {"use_cache"} == {"input_ids"}
    _, kwargs = example_inputs(_model(transformers, "wav2vec2", torch.float32))
    # two convolutions (kernel 3, stride 2) give 8 frames from (8 - 1)·2 + 3 = 17, then 35
    assert kwargs["input_values"].shape == (2, 35) and kwargs["input_values"].dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "inputs", "match"),
    [
        ("clip", "ids", "found no symmetry in CLIPModel: the candidates detected in 8 module"),
        ("siglip", "ids", "covered .*% of SiglipModel: the candidates detected in 9 module"),
    ],
)
def test_a_forward_that_does_not_run_warns_with_the_fix(transformers, name, inputs, match):
    """Token ids alone do not run a dual encoder: the warning names the candidates left
    unverified and the fix (example inputs), not "declare the bundles"."""
    model = _model(transformers, name, torch.float32)
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.warns(UserWarning, match=match) as caught:
        quotopt.symmetries(model, example_inputs=((), {"input_ids": ids}))
    message = str(caught[0].message)
    assert "the example forward failed" in message and "Pass example_inputs" in message
    assert "Declare the bundles" not in message


# ---- structure where the role names fail ----------------------------------------------------
class _Heads(nn.Module):
    """Attention with projections under names no list knows, registered in ``order``."""

    def __init__(self, order=("a", "b", "c"), d=16, n_heads=4):
        super().__init__()
        self.num_heads, self.order = n_heads, order
        for name in order:
            setattr(self, f"proj_{name}", nn.Linear(d, d))
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (getattr(self, f"proj_{n}")(x) for n in ("a", "b", "c"))
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.mix(y.transpose(1, 2).reshape(B, T, d))


class SelfAttention(_Heads):
    pass


def test_attention_by_structure_and_a_wrong_reading_rejected():
    """Registered q, k, v, out: found and verified. Registered v, k, q: the same reading takes
    the value for a query — both candidates change the output and none is returned."""
    x = torch.randn(2, 5, 16, dtype=F64)
    torch.manual_seed(0)
    right = nn.Sequential(SelfAttention()).double()
    groups, report = quotopt.symmetries(right, example_inputs=((x,), {}), report=True)
    assert _counts(groups) == {"HeadQK": 1, "HeadOV": 1}, str(report)
    assert all("by structure" in f.structure for f in report.groups)
    wrong = nn.Sequential(SelfAttention(order=("c", "b", "a"))).double()
    with pytest.warns(UserWarning, match="found no symmetry"):
        _, report = quotopt.symmetries(wrong, example_inputs=((x,), {}), report=True)
    notes = [f.note for f in report.findings if f.part in ("qk", "ov")]
    assert len(notes) == 2 and all("change" in n for n in notes), str(report)


# ---- what describe reports ------------------------------------------------------------------
class OddAttention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        return self.mix(x)


class _Layer(nn.Module):
    """BERT's layer layout: an MLP found through ``intermediate.dense``/``output.dense``."""

    def __init__(self, d=8, m=16):
        super().__init__()
        self.attention = OddAttention(d)
        self.intermediate, self.output = nn.Module(), nn.Module()
        self.intermediate.dense, self.output.dense = nn.Linear(d, m), nn.Linear(m, d)
        self.intermediate.act = nn.ReLU()

    def forward(self, x):
        x = self.attention(x)
        return self.output.dense(self.intermediate.act(self.intermediate.dense(x)))


def test_describe_keeps_attention_under_a_layer_whose_mlp_was_found(transformers):
    layer = _Layer().double()
    x = torch.randn(2, 3, 8, dtype=F64)
    report = quotopt.describe(layer, example_inputs=((x,), {}))
    assert [f.bundle for f in report.groups] == ["PositiveRescaling"]
    assert "unrecognised layout (OddAttention): declare it" in str(report)
    deberta = quotopt.describe(_model(transformers, "deberta-v2-relu", torch.float32))
    rows = {(f.path, f.part) for f in deberta.findings if f.bundle}
    assert {(f"encoder.layer.{i}.attention", p) for i in (0, 1) for p in ("qk", "ov")} <= rows


# ---- float64 ------------------------------------------------------------------------------------
class _Float32Only(nn.Module):
    def __init__(self, d=8, m=16):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(a, b) for a, b in
                                                        ((d, m), (d, m), (m, d)))  # fmt: skip

    def forward(self, x):
        if x.dtype != torch.float32:
            raise TypeError(f"expected float32, got {x.dtype}")
        return self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))


def test_a_module_that_cannot_run_in_float64_is_reported_as_such():
    with pytest.warns(UserWarning, match="found no symmetry"):
        report = quotopt.describe(nn.Sequential(_Float32Only()), example_inputs=None)
    note = next(f.note for f in report.findings if f.part == "units")
    assert note.startswith("not verified: the float64 copy of _Float32Only fails (TypeError")
    assert "quotopt.verify in the model's dtype" in note and "tried" not in note


def test_a_constant_built_in_the_default_dtype_does_not_stop_the_float64_check(transformers):
    """XGLM masks scores with ``torch.full((), finfo(scores.dtype).min)``, built in torch's
    default dtype: the float64 check runs with float64 as the default, where the control, a
    float64 copy under the float32 default, overflows."""
    config = transformers.XGLMConfig(d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
                                     vocab_size=VOCAB)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.XGLMForCausalLM(config).eval()
    groups, report = quotopt.symmetries(model, report=True)
    assert _counts(groups) == {"HeadQK": 2, "HeadOV": 2}, str(report)
    assert all(f.change <= 1e-12 for f in report.groups)
    args, kwargs = example_inputs(model)
    with pytest.raises(RuntimeError, match="overflow"):
        model.double()(*args, **kwargs)
    assert torch.get_default_dtype() == torch.float32


def _jamba(transformers, **extra):
    config = transformers.JambaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
        mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.JambaForCausalLM(config).eval()


def test_grouped_experts_name_the_eager_fix_and_eager_experts_verify(transformers):
    report = quotopt.describe(_jamba(transformers))
    experts = next(f for f in report.findings if f.path.endswith("experts"))
    assert "float64 copy of JambaExperts fails" in experts.note and not experts.bundle
    assert 'experts_implementation="eager"' in experts.note
    report = quotopt.describe(_jamba(transformers, experts_implementation="eager"))
    experts = next(f for f in report.findings if f.path.endswith("experts"))
    assert experts.bundle == "PositiveRescaling" and experts.change <= 1e-12


# ---- degree-2 activations ------------------------------------------------------------------
def test_homogeneity_degree_of_activations():
    relu2 = lambda x: torch.relu(x) ** 2  # noqa: E731
    assert homogeneity_degree(torch.relu) == homogeneity_degree(nn.ReLU()) == 1
    assert homogeneity_degree(nn.LeakyReLU(0.1)) == 1
    assert homogeneity_degree(relu2) == homogeneity_degree(lambda x: x * x.abs()) == 2
    for act in (nn.GELU(), nn.SiLU(), torch.tanh, lambda x: torch.relu(x) ** 3, torch.zeros_like):
        assert homogeneity_degree(act) is None


def _decoder(transformers, family, act=None):
    config_cls, model_cls, extra = {
        "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", {}),
        "nemotron": ("NemotronConfig", "NemotronForCausalLM",
                     dict(num_key_value_heads=2, head_dim=8)),
    }[family]  # fmt: skip
    kwargs = dict(TOWER, vocab_size=VOCAB, **extra, **({"hidden_act": act} if act else {}))
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


def _mlp_rows(report):
    return [f for f in report.findings if f.path.endswith(".mlp") and f.part == "units"]


@pytest.mark.parametrize("family", ["persimmon", "nemotron"])
def test_relu_squared_mlps_are_reported_as_degree_two(transformers, family):
    """ReLU² units: (s, s⁻²) is exact and found (degree-2 positive rescaling, verified); the
    controls: the same model with ReLU gets degree-1 rescaling, with GELU the "not
    homogeneous" reason (MLPs only: ``heads=False``)."""
    rows = _mlp_rows(quotopt.describe(_decoder(transformers, family), heads=False))
    assert [f.bundle for f in rows] == ["PositiveRescaling"] * 2
    assert all(f.change <= 1e-12 for f in rows)
    if family == "persimmon":
        return
    relu = _mlp_rows(quotopt.describe(_decoder(transformers, family, "relu"), heads=False))
    assert [f.bundle for f in relu] == ["PositiveRescaling"] * 2
    assert all(f.change <= 1e-12 for f in relu)
    with pytest.warns(UserWarning, match="found no symmetry"):
        gelu = _mlp_rows(quotopt.describe(_decoder(transformers, family, "gelu"), heads=False))
    assert len(gelu) == 2 and all("is not positively homogeneous" in f.note for f in gelu)


@pytest.mark.parametrize("family", ["persimmon", "nemotron"])
def test_a_degree_two_rescaling_bundle_is_taken_where_it_exists(transformers, family):
    """ReLU² units get the (s, s⁻²) group, ``PositiveRescaling(..., degree=2)``, and it
    verifies; the control: the (s, s⁻¹) group on the same units changes the output."""
    model = _decoder(transformers, family).double()
    groups, report = quotopt.symmetries(model, heads=False, report=True)
    rows = _mlp_rows(report)
    assert [f.bundle for f in rows] == ["PositiveRescaling"] * 2
    assert all(f.change <= 1e-12 for f in rows)
    units = [g for g in groups if g["name"].endswith("mlp.units")]
    assert [g["bundle"].degree for g in units] == [2, 2]
    args, kwargs = example_inputs(model)
    degree_one = [
        dict(g, bundle=M.PositiveRescaling(g["bundle"].n_heads, *g["bundle"].factor_rows))
        for g in units
    ]
    assert min(quotopt.verify(model, degree_one, *args, **kwargs).values()) > 1e-3
    assert max(quotopt.verify(model, units, *args, **kwargs).values()) <= 1e-9
